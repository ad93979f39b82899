import json

import pytest
import torch

from nanoseek.model import Transformer
from nanoseek.train import checkpoint as ck
from nanoseek.train.optim import make_optimizer


def _trained(cfg):
    model = Transformer(cfg)
    opt = make_optimizer(model, 1e-3)
    x = torch.randint(0, 256, (2, 9))
    model(x, targets=x).loss.backward()
    opt.step()
    model.update_balance_bias(0.01)
    return model, opt


def test_round_trip_restores_model_optimizer_biases_and_rng(tiny_cfg, tmp_path):
    model, opt = _trained(tiny_cfg)
    torch.manual_seed(42)
    path = ck.save_checkpoint(tmp_path, 7, model, opt, state={"tokens_seen": 5}, config=tiny_cfg.to_dict())
    expected_next = torch.rand(3)
    model2 = Transformer(tiny_cfg, seed=99)
    opt2 = make_optimizer(model2, 1e-3)
    meta = ck.load_checkpoint(path, model2, opt2)
    assert meta["step"] == 7 and meta["tokens_seen"] == 5
    for (k, v), v2 in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(v, v2), k
    assert model2.moe_layers()[0].gate.e_score_bias.abs().sum() > 0
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[i]["exp_avg_sq"], s2[i]["exp_avg_sq"]) for i in s1)
    assert torch.equal(torch.rand(3), expected_next)


def test_keep_last_prunes_old_checkpoints(tiny_cfg, tmp_path):
    model = Transformer(tiny_cfg)
    for step in (1, 2, 3, 4):
        ck.save_checkpoint(tmp_path, step, model, keep_last=2)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_0000003", "step_0000004"]


def test_interrupted_write_leaves_previous_checkpoint_loadable(tiny_cfg, tmp_path, monkeypatch):
    model = Transformer(tiny_cfg)
    good = ck.save_checkpoint(tmp_path, 1, model)

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck, "save_file", full_disk)
    with pytest.raises(ck.CheckpointError, match="No space left"):
        ck.save_checkpoint(tmp_path, 2, model)
    assert ck.list_checkpoints(tmp_path) == [good]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [good.name]  # no temp leftovers
    ck.load_checkpoint(good, Transformer(tiny_cfg))


def test_crash_midway_is_not_taken_for_a_checkpoint(tiny_cfg, tmp_path, monkeypatch):
    model = Transformer(tiny_cfg)
    good = ck.save_checkpoint(tmp_path, 1, model)

    class Crash(BaseException):  # like a kill mid-write: not an OSError, nothing catches it
        pass

    monkeypatch.setattr(ck, "_sha256", lambda p: (_ for _ in ()).throw(Crash()))
    with pytest.raises(Crash):
        ck.save_checkpoint(tmp_path, 2, model)
    monkeypatch.undo()
    assert ck.latest_valid_checkpoint(tmp_path) == good


def test_corruption_is_detected_and_skipped(tiny_cfg, tmp_path):
    model = Transformer(tiny_cfg)
    good = ck.save_checkpoint(tmp_path, 1, model)
    bad = ck.save_checkpoint(tmp_path, 2, model)
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (bad / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ck.CheckpointError, match="checksum mismatch"):
        ck.load_checkpoint(bad, Transformer(tiny_cfg))
    warnings = []
    assert ck.latest_valid_checkpoint(tmp_path, log=warnings.append) == good
    assert "checksum" in warnings[0]


def test_loading_a_run_says_when_an_older_checkpoint_stands_in(tiny_cfg, tmp_path, capsys):
    model = Transformer(tiny_cfg)
    good = ck.save_checkpoint(tmp_path, 1, model)
    bad = ck.save_checkpoint(tmp_path, 2, model)
    (bad / "model.safetensors").write_bytes((bad / "model.safetensors").read_bytes()[:-10])
    assert ck.resolve_checkpoint(tmp_path) == good  # sample / generate / serve load the older one...
    err = capsys.readouterr().err
    assert "step_0000002" in err and f"using {good.name}" in err  # ...and say so
    (good / "model.safetensors").write_bytes(b"")
    with pytest.raises(ck.CheckpointError, match="no valid checkpoint.*step_0000002"):
        ck.resolve_checkpoint(tmp_path)  # and when none loads, the error says why


def test_wrong_model_config_is_a_clear_error(tiny_cfg, tmp_path):
    path = ck.save_checkpoint(tmp_path, 1, Transformer(tiny_cfg))
    with pytest.raises(ck.CheckpointError, match="shape"):
        ck.load_checkpoint(path, Transformer(tiny_cfg.replace(vocab_size=300)))
    with pytest.raises(ck.CheckpointError, match="missing tensor"):
        ck.load_checkpoint(path, Transformer(tiny_cfg.replace(num_hidden_layers=3)))
    (path / "state.json").write_text("{oops")
    with pytest.raises(ck.CheckpointError, match="corrupt"):
        ck.read_state(path)


def test_tied_embeddings_are_stored_once(tiny_cfg, tmp_path):
    cfg = tiny_cfg.replace(tie_word_embeddings=True)
    model = Transformer(cfg, seed=3)
    path = ck.save_checkpoint(tmp_path, 1, model)
    model2 = Transformer(cfg, seed=4)
    ck.load_checkpoint(path, model2)
    assert model2.head.weight is model2.embed.weight
    assert torch.equal(model2.head.weight, model.head.weight)
    assert json.loads((path / "state.json").read_text())["files"]["model.safetensors"]


def test_nanoseek_load_reads_a_run_folder(tiny_cfg, tmp_path):
    import nanoseek

    model, _ = _trained(tiny_cfg)
    ck.save_checkpoint(tmp_path, 3, model, config=tiny_cfg.to_dict())
    loaded = nanoseek.load(tmp_path)
    assert not loaded.training
    x = torch.randint(0, 256, (1, 8))
    model.eval()
    torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
    with pytest.raises(ck.CheckpointError, match="no valid checkpoint"):
        ck.load_model(tmp_path / "checkpoints")
