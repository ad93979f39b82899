"""Verifiable tasks (nanoseek/post/tasks): deterministic generators, disjoint splits, traces that check out,
the countdown checker's safety, user problem files."""

import json
import random

import pytest

from nanoseek.post.tasks import CHECKERS, Problem, TaskError, check_answer, extract_answer, make_task
from nanoseek.post.tasks.arithmetic import addition_trace, multiplication_trace, subtraction_trace
from nanoseek.post.tasks.countdown import UnsafeExpression, check_countdown, evaluate_expression

SPECS = ["add", "sub", "mul", "countdown", "linear", "add:digits=4,operands=3", "mul:digits=3,digits_b=1"]


@pytest.mark.parametrize("spec", SPECS)
def test_generators_are_deterministic_given_the_seed(spec):
    task = make_task(spec)
    a = [p.prompt for p in task.problems("train", 20, seed=3)]
    b = [p.prompt for p in make_task(spec).problems("train", 20, seed=3)]
    c = [p.prompt for p in task.problems("train", 20, seed=4)]
    assert a == b and a != c


@pytest.mark.parametrize("spec", SPECS)
def test_train_and_test_splits_are_disjoint(spec):
    task = make_task(spec)
    train = {p.prompt for p in task.problems("train", 1500, seed=0)}
    test = {p.prompt for p in task.problems("test", 200, seed=0)}
    assert test and train and not train & test
    assert all(task.split(p) == "test" for p in task.problems("test", 50, seed=9))


@pytest.mark.parametrize("spec", SPECS)
def test_reference_solutions_pass_their_checker(spec):
    task = make_task(spec)
    for p in task.problems("train", 200, seed=1):
        assert check_answer(p.task, extract_answer(p.solution()), p.answer, **p.fields), p
        assert p.solution().startswith("<think>") and p.solution().endswith("</answer>")


def test_arithmetic_answers_are_right_and_traces_end_in_the_answer():
    rng = random.Random(0)
    for _ in range(300):
        a, b, c = rng.randint(0, 99999), rng.randint(0, 99999), rng.randint(0, 999)
        assert addition_trace([a, b, c]).splitlines()[-1].endswith(f", {a + b + c}")
        hi, lo = max(a, b), min(a, b)
        assert int(subtraction_trace(hi, lo).splitlines()[-1].split(", ")[1]) == hi - lo
        assert multiplication_trace(a, c).splitlines()[-1].endswith(f"={a * c}")
    assert addition_trace([347, 285]) == "7+5=12, 2\n4+8+1=13, 32\n3+2+1=6, 632"
    assert subtraction_trace(347, 285) == "7-5=2, 2\n14-8=6, 62\n3-2-1=0, 062"
    assert multiplication_trace(47, 36) == "47*6=282\n47*30=1410\n282+1410=1692"


def test_difficulty_knobs_bound_the_operands():
    for p in make_task("mul:digits=3,min_digits=3,digits_b=2").problems("train", 100):
        a, b = map(int, p.prompt.removeprefix("What is ").removesuffix("?").split("*"))
        assert 100 <= a <= 999 and 0 <= b <= 99
    for p in make_task("add:digits=2,operands=4").problems("train", 50):
        assert p.prompt.count("+") == 3
    for p in make_task("countdown:numbers=4,max_number=9").problems("train", 50):
        assert len(p.fields["numbers"]) == 4 and max(p.fields["numbers"]) <= 9


@pytest.mark.parametrize(
    "spec", ["nope", "mul:digits", "mul:digits=x", "mul:bogus=3", "sub:operands=3", "countdown:numbers=1"]
)
def test_bad_task_specs_raise_task_error(spec):
    with pytest.raises(TaskError):
        make_task(spec)


def test_mixture_draws_from_every_task_and_checks_each_with_its_own_checker():
    problems = make_task("add+countdown").problems("train", 100)
    assert {p.task for p in problems} == {"add", "countdown"}
    assert set(CHECKERS) >= {"add", "sub", "mul", "countdown", "linear", "jsonl"}


# ---- answers ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text,expected",
    [
        ("<think>x</think><answer> 42 </answer>", "42"),
        ("<answer>1</answer><answer>2</answer>", None),  # repeated: no answer
        ("<answer>7", None),
        ("7</answer>", None),
        ("", None),
        ("no tags at all", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "given,ok",
    [
        ("1692", True),
        (" 1692", True),
        ("+1692", True),
        ("1,692", False),
        ("1692.0", False),
        ("1e3", False),
        ("", False),
        ("abc", False),
    ],
)
def test_integer_checker_is_strict(given, ok):
    assert check_answer("mul", given, "1692") is ok


# ---- countdown ----------------------------------------------------------------------------------------------
def test_countdown_evaluates_exactly():
    assert evaluate_expression("(25 - 7) * 3") == (54, [25, 7, 3])
    assert evaluate_expression("(1/3)*3")[0] == 1
    assert check_countdown("(25-7)*3", numbers=[3, 7, 25], target=54)
    assert check_countdown("3*(25-7)", numbers=[25, 3, 7], target=54)


@pytest.mark.parametrize(
    "expr",
    [
        "(25-7)*3+3",  # 3 reused
        "(25-7)*7",  # 7 reused, 3 unused
        "25*3",  # a number left out
        "(25-7)*03",  # still uses 3 once (leading zero is a syntax error in Python 3)
    ],
)
def test_countdown_rejects_reused_missing_or_odd_numbers(expr):
    assert not check_countdown(expr, numbers=[3, 7, 25], target=54)


@pytest.mark.parametrize(
    "expr",
    [
        "__import__('os').system('echo hi')",
        "open('/etc/passwd')",
        "2**100",
        "-3+5",  # unary minus is not an allowed operation
        "3.5*2",
        "(1)(2)",
        "1/0",
        "(" * 150 + "1" + ")" * 150,
        "9" * 300,
        "lambda: 1",
        "[1, 2]",
        "1 if 1 else 2",
        "1 // 1",
        "1 % 1",
        "",
    ],
)
def test_countdown_rejects_unsafe_expressions_without_evaluating_them(expr):
    with pytest.raises(UnsafeExpression):
        evaluate_expression(expr)
    assert not check_countdown(expr, numbers=[1, 2], target=3)


def test_countdown_problems_are_solvable_by_construction():
    for p in make_task("countdown:numbers=4").problems("train", 100):
        value, used = evaluate_expression(p.answer)
        assert value == p.fields["target"] and sorted(used) == p.fields["numbers"]


# ---- user problems ------------------------------------------------------------------------------------------
def test_jsonl_problems_load_split_and_check(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": f"What is {i} halves?", "answer": i / 2, "unit": "x"} for i in range(200)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    task = make_task(str(path))
    train, test = task.problems("train", 500), task.problems("test", 500)
    assert len(train) + len(test) == 200 and not {p.prompt for p in train} & {p.prompt for p in test}
    p = next(p for p in train + test if p.prompt == "What is 3 halves?")
    assert p.fields == {"unit": "x"} and p.task == "jsonl"
    assert check_answer("jsonl", "3/2", p.answer) and check_answer("jsonl", " 1.5 ", p.answer)
    assert not check_answer("jsonl", "1.6", p.answer)


@pytest.mark.parametrize(
    "content,message",
    [
        ("{bad json\n", ":1: not valid JSON"),
        ('{"answer": 1}\n', ":1: each line"),
        ('{"prompt": "q"}\n', "answer"),
        ("", "no problems"),
    ],
)
def test_bad_problem_files_name_the_line(tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(TaskError, match=message):
        make_task(str(path))


def test_problem_reward_fields_hold_task_answer_and_extras():
    p = Problem("countdown", "q", "1+2", fields={"numbers": [1, 2], "target": 3})
    assert p.reward_fields() == {"task": "countdown", "answer": "1+2", "numbers": [1, 2], "target": 3}
