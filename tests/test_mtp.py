import torch
import torch.nn.functional as F

from nanoseek.model import Transformer


def _model(cfg, depth=2):
    return Transformer(cfg.replace(num_nextn_predict_layers=depth, initializer_range=0.05), seed=0)


def test_mtp_loss_uses_targets_shifted_by_k(tiny_cfg):
    model = _model(tiny_cfg, depth=2)
    tokens = torch.randint(0, 256, (2, 17))
    inp, tgt = tokens[:, :-1], tokens[:, 1:]
    out = model(inp, targets=tgt)
    T = inp.shape[1]
    assert [lg.shape[1] for lg in out.mtp_logits] == [T - 1, T - 2]
    # depth k at position i predicts t_{i+k+1} = targets[:, i+k]
    ref = sum(
        F.cross_entropy(lg.flatten(0, 1), tgt[:, k:].flatten()) for k, lg in enumerate(out.mtp_logits, 1)
    )
    torch.testing.assert_close(out.mtp_loss, ref * model.cfg.mtp_lambda / 2)
    torch.testing.assert_close(out.loss, out.lm_loss + out.mtp_loss + out.balance_loss)


def test_mtp_depth_k_sees_tokens_up_to_i_plus_k_only(tiny_cfg):
    """Causality of the MTP chain: depth-k logits at position i depend on t_0..t_{i+k}, not on t_{i+k+1}."""
    model = _model(tiny_cfg, depth=2).eval()  # eval: no balance-loss side effects
    tokens = torch.randint(0, 256, (1, 12))
    i = 4
    for k in (1, 2):
        base = model(tokens, targets=tokens).mtp_logits[k - 1][0, i]
        changed_future = tokens.clone()
        changed_future[0, i + k + 1] = (tokens[0, i + k + 1] + 1) % 256
        same = model(changed_future, targets=tokens).mtp_logits[k - 1][0, i]
        torch.testing.assert_close(base, same)
        changed_input = tokens.clone()
        changed_input[0, i + k] = (tokens[0, i + k] + 1) % 256  # t_{i+k} is depth k's embedding input
        diff = model(changed_input, targets=tokens).mtp_logits[k - 1][0, i]
        assert (diff - base).abs().max() > 1e-4


def test_mtp_gradients_reach_main_model_and_module(tiny_cfg):
    model = _model(tiny_cfg, depth=1)
    tokens = torch.randint(0, 256, (2, 9))
    out = model(tokens[:, :-1], targets=tokens[:, 1:])
    out.mtp_loss.backward()
    assert model.mtp[0].eh_proj.weight.grad.abs().sum() > 0
    assert model.layers[0].attn.wkv_a.weight.grad.abs().sum() > 0  # MTP trains the trunk too
    assert model.embed.weight.grad.abs().sum() > 0


def test_inference_skips_mtp(tiny_cfg):
    model = _model(tiny_cfg, depth=1)
    out = model(torch.randint(0, 256, (1, 5)))
    assert out.mtp_logits == [] and out.loss is None
