"""Held-out evaluation (nanoseek/post/evaluate.py): the unbiased pass@k estimator and the scoring of groups."""

import math

import pytest

from nanoseek.post.evaluate import pass_at_k, score
from nanoseek.post.rollout import Completion
from nanoseek.post.tasks import Problem


def test_pass_at_k_matches_the_closed_form():
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(5, 2))  # 0.7
    assert pass_at_k(8, 0, 8) == 0.0 and pass_at_k(8, 1, 8) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the mean accuracy
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_score_groups_accuracy_and_format_per_completion():
    problems = [
        Problem("mul", "q1", "12"),
        Problem("countdown", "q2", "1+2", fields={"numbers": [1, 2], "target": 3}),
    ]
    groups = [
        [
            Completion([], [], "<think></think><answer>12</answer>", False),
            Completion([], [], "<answer>12</answer>", False),
        ],
        [Completion([], [], "<think>a</think><answer>2+1</answer>", False)],
    ]
    acc, fmt = score(problems, groups)
    assert acc == [[1.0, 1.0], [1.0]] and fmt == [[1.0, 0.0], [1.0]]
