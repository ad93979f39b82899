import pytest

from nanoseek.config import get_preset
from nanoseek.train.ablate import _loss_at_time, ablate, variants
from nanoseek.train.run import prepare_data
from nanoseek.train.trainer import TrainConfig


def test_each_group_changes_exactly_one_switch():
    base = get_preset("tiny")
    att = variants(base, "attention")
    assert [c.attention for c in att.values()] == ["mla", "mha", "gqa"]
    moe, dense = variants(base, "ffn").values()
    # same activated FFN width: (K routed + shared) x expert width
    assert dense.ffn == "dense" and dense.intermediate_size == (4 + 1) * 64 and moe == base
    assert [c.balancing for c in variants(base, "balancing").values()] == ["aux_free", "aux_loss", "none"]
    assert [c.num_nextn_predict_layers for c in variants(base, "mtp").values()] == [1, 0]
    with pytest.raises(ValueError, match="unknown group"):
        variants(base, "dropout")


def test_loss_at_time_interpolates_and_never_extrapolates_backwards():
    evals = [(10, 2.0, 5.0), (20, 4.0, 3.0)]
    assert _loss_at_time(evals, 3.0) == pytest.approx(4.0)
    assert _loss_at_time(evals, 1.0) is None
    assert _loss_at_time(evals, 9.0) == 3.0


def test_ablation_end_to_end_reuses_the_shared_base_run(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOSEEK_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data"
    data.mkdir()
    for i in range(20):
        (data / f"{i}.txt").write_text(" ".join(f"w{(i * j) % 37}" for j in range(300)))
    prepared = prepare_data(str(data), None, 300, log=lambda *a: None, progress=False)
    base = get_preset("tiny").replace(hidden_size=64, num_attention_heads=2, intermediate_size=128)
    tcfg = TrainConfig(
        out="", seq_len=32, batch_size=2, steps=2, eval_every=1, eval_batches=2, warmup_steps=0
    )
    tcfg.validate(base.replace(vocab_size=prepared.tokenizer.vocab_size))
    logs = []
    res = ablate(
        base,
        tcfg,
        prepared,
        ["mtp", "balancing"],
        str(tmp_path / "runs"),
        tmp_path / "doc.md",
        "nanoseek ablate",
        log=logs.append,
    )
    assert [r["name"] for r in res["mtp"]][1] == "no MTP"
    assert any("done already" in line for line in logs)  # the base model ran once for both groups
    assert res["balancing"][0]["max_vio_global"] is not None
    doc = (tmp_path / "doc.md").read_text()
    assert "## mtp" in doc and "## balancing" in doc and (tmp_path / "img" / "ablation_mtp.png").exists()
    # Hand-written findings under a group's marker survive regenerating the doc (all runs reused, no training).
    doc_path = tmp_path / "doc.md"
    doc_path.write_text(doc.replace("<!-- findings:mtp -->", "<!-- findings:mtp -->\nMTP helps here.", 1))
    ablate(base, tcfg, prepared, ["mtp", "balancing"], str(tmp_path / "runs"), doc_path, "x", log=logs.append)
    regenerated = doc_path.read_text()
    assert regenerated.index("<!-- findings:mtp -->") < regenerated.index("MTP helps here.")
    assert regenerated.count("MTP helps here.") == 1
    assert regenerated.index("MTP helps here.") < regenerated.index("## balancing")
