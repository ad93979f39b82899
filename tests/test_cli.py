"""The `nanoseek` command: `inspect` prints the published numbers, `--json` carries every field, bad input
gives one `nanoseek: error: ...` line and exit status 2 without a traceback (main() catches it, so nothing
escapes to pytest either)."""

import json
import subprocess
import sys

import pytest

from nanoseek.cli import main
from nanoseek.config import PRESETS, get_preset, to_hf_dict


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_v3_prints_the_published_figures(capsys):
    code, out, err = run(capsys, "inspect", "--preset", "deepseek-v3")
    assert code == 0 and err == ""
    for published in (
        "671,026,419,200",  # main model [REFERENCE §1]
        "671.03B",
        "37.55B",  # activated incl. embedding + head
        "11.61B",  # MTP unique
        "13.46B",  # MTP as stored
        "684,489,845,504",  # main + MTP as stored ("685B" [RM])
        "70,272",  # MLA KV bytes per token [REFERENCE §3]
        "71.1x",  # vs an MHA twin
        "2,788,000",  # H800 GPU-hours [V3 Table 1]
        "$5,576,000",
        "33.6%",  # implied MFU under 6 N_act
    ):
        assert published in out, published
    assert "no causal halving" in out and "6 N_act" in out  # conventions are stated


def test_inspect_defaults_to_v3(capsys):
    code, out, _ = run(capsys, "inspect")
    assert code == 0 and out.startswith("deepseek-v3:")


def test_inspect_json_has_every_field(capsys):
    code, out, _ = run(capsys, "inspect", "--preset", "deepseek-v3", "--json")
    assert code == 0
    r = json.loads(out)
    assert set(r) >= {"params", "activated", "flops_per_token", "kv_cache", "cost", "published_v3"}
    assert r["params"]["main"] == 671_026_419_200
    assert r["activated"]["with_embedding_and_head"] == 37_552_297_472
    assert r["kv_cache"]["this_model"] == 576
    assert round(r["cost"]["gpu_hours"]) == 2_788_000
    assert r["flops_per_token"]["seq_len"] == 4096


def test_inspect_all_lists_every_preset(capsys):
    code, out, _ = run(capsys, "inspect", "--all")
    assert code == 0
    assert all(name in out for name in PRESETS)
    code, out, _ = run(capsys, "inspect", "--all", "--json")
    assert code == 0 and set(json.loads(out)) == set(PRESETS)


def test_cost_flags_change_the_cost(capsys):
    argv = ["inspect", "--preset", "tiny", "--json", "--tokens", "1B", "--gpu", "a100", "--mfu", "0.5"]
    code, out, _ = run(capsys, *argv, "--price", "1.5", "--gpus", "8")
    cost = json.loads(out)["cost"]
    assert code == 0
    assert (cost["tokens"], cost["gpu"], cost["mfu"], cost["n_gpus"]) == (1e9, "A100", 0.5, 8)
    assert cost["gpu_hours"] == pytest.approx(cost["flops_per_token"] * 1e9 / (312e12 * 0.5) / 3600)
    assert cost["dollars"] == pytest.approx(1.5 * cost["gpu_hours"])
    code, out, _ = run(capsys, "inspect", "--json", "--gpu-hours-per-trillion", "180000")
    assert round(json.loads(out)["cost"]["gpu_hours"]) == 2_664_000  # V3 pre-training [V3 Table 1]


def test_inspect_reads_our_json_and_hf_config_files(tmp_path, capsys):
    ours, hf = tmp_path / "tiny.json", tmp_path / "config.json"
    get_preset("tiny").save(ours)
    hf.write_text(json.dumps(to_hf_dict(get_preset("tiny"))))
    _, direct, _ = run(capsys, "inspect", "--preset", "tiny", "--json")
    expected = json.loads(direct)["params"]["main"]
    for path in (ours, hf, tmp_path):  # a folder holding config.json works too
        code, out, err = run(capsys, "inspect", "--config", str(path), "--json")
        assert code == 0, err
        assert json.loads(out)["params"]["main"] == expected


@pytest.mark.parametrize(
    "argv, names",
    [
        (["inspect", "--preset", "deepseek-v9"], "deepseek-v9"),
        (["inspect", "--config", "/no/such/config.json"], "not found"),
        (["inspect", "--config", "{bad}"], "{bad}"),
        (["inspect", "--tokens", "lots"], "--tokens"),
        (["inspect", "--tokens", "-5"], "--tokens"),
        (["inspect", "--mfu", "40"], "--mfu"),
        (["inspect", "--gpu", "tpu"], "--gpu"),
        (["inspect", "--gpu", "a100", "--precision", "fp8"], "FP8"),
        (["inspect", "--preset", "tiny", "--gqa-groups", "64"], "--gqa-groups"),
        (["inspect", "--preset", "tiny", "--all"], "--all"),
        (["inspect", "--mfu", "0.3", "--gpu-hours-per-trillion", "1e5"], "--gpu-hours-per-trillion"),
        (["inspect", "--bogus"], "--bogus"),
        (["frobnicate"], "frobnicate"),
        ([], "command"),
    ],
)
def test_bad_input_is_one_error_line_and_status_2(argv, names, capsys):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("nanoseek: error: "), err
    assert names in err


@pytest.mark.parametrize(
    "content, names",
    [
        ("{not json", "not valid JSON"),
        ('{"hidden_size": 64, "colour": "red"}', "colour"),
        ('{"num_hidden_layers": -1}', "num_hidden_layers"),
        ('{"rms_norm_eps": "small"}', "rms_norm_eps: expected float"),
        ("[1, 2]", "JSON object"),
    ],
)
def test_bad_config_file_is_one_error_line(tmp_path, content, names, capsys):
    path = tmp_path / "bad.json"
    path.write_text(content)
    code, out, err = run(capsys, "inspect", "--config", str(path))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("nanoseek: error: ") and names in err, err


@pytest.mark.parametrize("argv", [["--help"], ["inspect", "--help"]])
def test_help_everywhere(argv, capsys):
    code, out, _ = run(capsys, *argv)
    assert code == 0
    assert "usage: nanoseek" in out
    if "inspect" in argv:
        assert all(
            flag in out for flag in ("--preset", "--config", "--all", "--json", "--tokens", "--gpu", "--mfu")
        )


def test_python_dash_m_runs_the_command():
    done = subprocess.run(
        [sys.executable, "-m", "nanoseek", "inspect", "--preset", "tiny", "--json"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["name"] == "tiny"


def _corpus(path):
    import random

    rng = random.Random(0)
    words = "the king queen lord love night day sword crown heart death fair sweet honour blood".split()
    path.mkdir()
    for i in range(30):
        (path / f"d{i}.txt").write_text(
            "\n".join(" ".join(rng.choice(words) for _ in range(10)) for _ in range(40))
        )
    return path


def test_train_resume_and_sample_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NANOSEEK_CACHE", str(tmp_path / "cache"))
    data, out = str(_corpus(tmp_path / "data")), str(tmp_path / "run")
    common = ["--data", data, "--vocab-size", "400", "--seq-len", "32", "--batch-size", "4", "--out", out]
    code, stdout, _ = run(capsys, "train", *common, "--steps", "4", "--ckpt-every", "2", "--no-progress")
    assert code == 0 and json.loads(stdout.strip().splitlines()[-1])["status"] == "finished"
    code, stdout, _ = run(
        capsys, "train", *common, "--steps", "6", "--resume", "--no-progress", "--mtp-depth", "1"
    )
    assert code == 0 and json.loads(stdout.strip().splitlines()[-1])["step"] == 6
    code, stdout, _ = run(
        capsys, "sample", "--run", out, "--prompt", "the king", "--max-tokens", "5", "--seed", "0"
    )
    assert code == 0 and stdout.startswith("the king")
    code, _, err = run(capsys, "sample", "--run", out, "--prompt", "the king", "--max-tokens", "5000")
    assert code == 2 and "context" in err and err.count("\n") == 1, err


@pytest.mark.parametrize(
    "argv, names",
    [
        (["train", "--data", "/no/such/dir", "--steps", "2"], "/no/such/dir"),
        (["train", "--steps", "0"], "--steps"),
        (["train"], "--steps or --tokens"),
        (["train", "--steps", "2", "--attention", "gqa"], "n_kv_heads"),
        (["train", "--steps", "2", "--preset", "nope"], "--preset"),
        (["sample", "--run", "/no/such/run"], "/no/such/run"),
        (["sample", "--run", "/no/such/run", "--top-k", "-1"], "--top-k"),
        (["ablate", "--groups", " , "], "--groups"),
        (["train", "--steps", "2", "--warmup-steps", "-1"], "--warmup-steps"),
        (["train", "--steps", "2", "--min-lr-ratio", "2"], "--min-lr-ratio"),
    ],
)
def test_train_and_sample_bad_input_is_one_line(argv, names, capsys):
    code, out, err = run(capsys, *argv)
    assert code == 2 and err.count("\n") == 1 and err.startswith("nanoseek: error: ") and names in err, err


def test_resume_keeps_the_runs_settings_and_refuses_another_tokenizer(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NANOSEEK_CACHE", str(tmp_path / "cache"))
    data, out = str(_corpus(tmp_path / "data")), tmp_path / "run"
    first = ["--data", data, "--vocab-size", "400", "--seq-len", "32", "--out", str(out), "--no-progress"]
    code, _, _ = run(
        capsys, "train", *first, "--steps", "2", "--batch-size", "4", "--lr", "1e-3", "--ckpt-every", "2"
    )
    assert code == 0
    # a bare --resume: batch size and learning rate are the run's, not the defaults (16, 3e-3)
    code, stdout, _ = run(
        capsys, "train", "--out", str(out), "--resume", "--steps", "3", "--data", data, "--no-progress"
    )
    assert code == 0 and json.loads(stdout.strip().splitlines()[-1])["step"] == 3
    saved = json.loads((out / "train_config.json").read_text())
    assert (saved["batch_size"], saved["lr"], saved["seq_len"]) == (4, 1e-3, 32)
    # resuming on other data, whose tokenizer differs, is refused before anything in the run is touched
    tok = (out / "tokenizer.json").read_bytes()
    other = tmp_path / "other"
    other.mkdir()
    for i in range(10):
        (other / f"o{i}.txt").write_text("zebra quartz xylophone " * 100 + str(i))
    code, _, err = run(
        capsys, "train", "--out", str(out), "--resume", "--data", str(other), "--vocab-size", "400"
    )
    assert code == 2 and "another tokenizer" in err and err.count("\n") == 1, err
    assert (out / "tokenizer.json").read_bytes() == tok


def test_resume_with_only_corrupt_checkpoints_is_an_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NANOSEEK_CACHE", str(tmp_path / "cache"))
    data, out = str(_corpus(tmp_path / "data")), tmp_path / "run"
    common = [
        "--data",
        data,
        "--vocab-size",
        "400",
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--out",
        str(out),
    ]
    assert run(capsys, "train", *common, "--steps", "2", "--ckpt-every", "2", "--no-progress")[0] == 0
    for weights in (out / "checkpoints").glob("step_*/model.safetensors"):
        weights.write_bytes(weights.read_bytes()[:100])  # truncated
    code, _, err = run(capsys, "train", *common, "--resume", "--steps", "4", "--no-progress")
    assert code == 2 and "no checkpoint" in err and "loads" in err, err
    assert not (out / "previous").exists()  # the run was not moved aside as if starting afresh


def test_one_short_text_file_is_cut_into_documents_and_trains(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NANOSEEK_CACHE", str(tmp_path / "cache"))
    small = tmp_path / "small.txt"
    small.write_text(
        "to be or not to be, that is the question\n" * 500
    )  # 21K characters: one file, ~16 documents
    argv = ["train", "--data", str(small), "--vocab-size", "300", "--seq-len", "32", "--batch-size", "4"]
    code, out, err = run(capsys, *argv, "--steps", "1", "--out", str(tmp_path / "run"), "--no-progress")
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["status"] == "finished", err
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("to be or not to be\n" * 20)  # too short for two documents of 1K characters
    code, _, err = run(
        capsys, "train", "--data", str(tiny), "--vocab-size", "300", "--steps", "1", "--no-progress"
    )
    assert code == 2 and "holds 1" in err and "a folder of several files" in err and err.count("\n") == 1, err


def test_os_errors_name_the_path_without_errno_noise(tmp_path, capsys):
    text = tmp_path / "c.txt"
    text.write_text("to be or not to be\n" * 200)
    (tmp_path / "a_folder").mkdir()  # --out names a folder: the rename of the temp file onto it fails
    argv = [
        "tokenizer",
        "train",
        "--data",
        str(text),
        "--vocab-size",
        "300",
        "--out",
        str(tmp_path / "a_folder"),
    ]
    code, _, err = run(capsys, *argv)
    assert code == 2 and err == f"nanoseek: error: {tmp_path / 'a_folder'}: is a directory\n", err


def test_train_reads_a_folder_that_prepare_wrote(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NANOSEEK_CACHE", str(tmp_path / "cache"))
    corpus, tok, data = _corpus(tmp_path / "corpus"), tmp_path / "tok.json", tmp_path / "data"
    assert (
        run(capsys, "tokenizer", "train", "--data", str(corpus), "--vocab-size", "300", "--out", str(tok))[0]
        == 0
    )
    assert run(capsys, "prepare", "--data", str(corpus), "--tokenizer", str(tok), "--out", str(data))[0] == 0
    common = [
        "train",
        "--data",
        str(data),
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--steps",
        "1",
        "--no-progress",
    ]
    code, out, _ = run(capsys, *common, "--tokenizer", str(tok), "--out", str(tmp_path / "run"))
    assert (
        code == 0 and "(prepared)" in out and json.loads(out.strip().splitlines()[-1])["status"] == "finished"
    )
    code, _, err = run(capsys, *common, "--out", str(tmp_path / "run2"))  # which tokenizer? it must be said
    assert code == 2 and "--tokenizer" in err, err
    code, _, err = run(
        capsys,
        "prepare",
        "--data",
        str(corpus),
        "--tokenizer",
        str(tok),
        "--out",
        str(data),
        "--val-fraction",
        "1",
    )
    assert code == 2 and "--val-fraction" in err, err
