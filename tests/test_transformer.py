import pytest
import torch

from nanoseek.config import get_preset
from nanoseek.model import Transformer


def test_forward_shapes_loss_and_every_parameter_gets_a_gradient(tiny_cfg):
    model = Transformer(tiny_cfg)
    tokens = torch.randint(0, 256, (2, 17))
    out = model(tokens[:, :-1], targets=tokens[:, 1:])
    assert out.logits.shape == (2, 16, 256)
    # at init (std 0.006) the model is near uniform: loss ~ ln(vocab)
    assert out.lm_loss.item() == pytest.approx(torch.log(torch.tensor(256.0)).item(), rel=0.02)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name


def test_init_is_deterministic_and_paper_std(tiny_cfg):
    a, b = Transformer(tiny_cfg, seed=3), Transformer(tiny_cfg, seed=3)
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), n
    w = a.layers[1].ffn.experts.w1
    assert w.std().item() == pytest.approx(0.006, rel=0.05)
    assert not torch.equal(Transformer(tiny_cfg, seed=4).embed.weight, a.embed.weight)


def test_dense_first_layers_then_moe(tiny_cfg):
    from nanoseek.model.layers import MLP
    from nanoseek.model.moe import MoE

    model = Transformer(tiny_cfg.replace(num_hidden_layers=3, first_k_dense_replace=2))
    assert [type(b.ffn) for b in model.layers] == [MLP, MLP, MoE]
    assert isinstance(model.mtp[0].block.ffn, MoE)
    dense = Transformer(tiny_cfg.replace(ffn="dense"))
    assert dense.moe_layers() == []


def test_full_model_decode_equals_training_path(tiny_cfg):
    model = Transformer(tiny_cfg.replace(initializer_range=0.05)).eval()
    x = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        full = model(x).logits
        cache = model.make_cache(2, 20)
        steps = [
            model(x[:, t : t + 1], positions=torch.full((2, 1), t), cache=cache).logits for t in range(20)
        ]
    assert (torch.cat(steps, 1) - full).abs().max() <= 1e-5


def test_tied_embeddings(tiny_cfg):
    model = Transformer(tiny_cfg.replace(tie_word_embeddings=True))
    assert model.head.weight is model.embed.weight


def test_update_balance_bias_reports_max_vio_per_moe_layer(tiny_cfg):
    model = Transformer(tiny_cfg.replace(initializer_range=0.05))
    model(torch.randint(0, 256, (2, 9)), targets=torch.randint(0, 256, (2, 9)))
    vios = model.update_balance_bias()
    assert len(vios) == len(model.moe_layers()) == 2  # layer 1 + the MTP block
    assert all(v >= 0 for v in vios)
    assert model.moe_layers()[0].gate.e_score_bias.abs().sum() > 0


def test_v3_builds_on_meta_device_without_memory():
    with torch.device("meta"):
        model = Transformer(get_preset("deepseek-v3"))
    assert model.embed.weight.is_meta
    assert model.num_params() > 6.7e11
