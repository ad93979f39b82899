import sys

import pytest
import torch

from nanoseek import hardware
from nanoseek.hardware import measure_matmul_flops, tune_allocator


def test_tune_allocator_reports_what_it_did(monkeypatch):
    said = tune_allocator()
    if sys.platform.startswith("linux") and "glibc" in " ".join(__import__("platform").libc_ver()):
        assert said.startswith("glibc mallopt")
    monkeypatch.setenv("NANOSEEK_NO_MALLOPT", "1")
    assert tune_allocator() == "default allocator"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page-fault counters are Linux-only here")
def test_tuned_allocator_reuses_freed_memory():
    """A training step's pattern, ~100 MB of activations allocated then all freed, repeated: once tuned, later
    rounds reuse the heap instead of faulting in fresh pages (glibc 2.36 defaults: ~27k faults for 5 rounds)."""
    import resource

    if not tune_allocator().startswith("glibc"):
        pytest.skip("not glibc")

    def rounds(n):
        for _ in range(n):
            keep = [torch.ones(3 << 20) for _ in range(8)]  # 8 x 12 MiB
            del keep

    rounds(2)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    rounds(5)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 6000


def test_measured_peak_is_positive():
    assert measure_matmul_flops(128, 0.01) > 0


# ---- the fp32 matmul kernel switch (hardware.fast_matmul) ----------------------------------------------
def _switch_exists() -> bool:
    return hardware._onednn_switch_exists()


def test_exactness_probe_catches_a_bf16_matmul():
    if not _switch_exists():
        pytest.skip("this torch has no oneDNN fp32 matmul switch")

    def bf16_matmul(a, b):  # what a bf16 matrix unit would compute
        return a.bfloat16().float() @ b.bfloat16().float()

    def fp32_matmul(a, b):
        return (a.double() @ b.double()).float()

    assert not hardware.onednn_matmul_is_exact(bf16_matmul)
    assert hardware.onednn_matmul_is_exact(fp32_matmul)


def test_fast_matmul_restores_the_setting_even_on_error():
    if not _switch_exists():
        pytest.skip("this torch has no oneDNN fp32 matmul switch")
    before = torch.backends.mkldnn.matmul.fp32_precision
    with pytest.raises(RuntimeError), hardware.fast_matmul(True):
        raise RuntimeError("boom")
    assert torch.backends.mkldnn.matmul.fp32_precision == before


def test_env_turns_fast_matmul_off(monkeypatch):
    monkeypatch.setattr(hardware, "_FAST_MATMUL", None)
    monkeypatch.setenv("NANOSEEK_ONEDNN_MATMUL", "0")
    assert hardware.fast_matmul_available() is False
    before = torch.backends.mkldnn.matmul.fp32_precision if _switch_exists() else None
    with hardware.fast_matmul():
        if before is not None:
            assert torch.backends.mkldnn.matmul.fp32_precision == before


def test_training_step_under_fast_matmul_matches_the_default():
    """Same loss and gradients, to fp32 rounding, with the step's GEMMs on oneDNN (where it is exact here)."""
    if not (_switch_exists() and hardware.onednn_matmul_is_exact()):
        pytest.skip("oneDNN's fp32 matmul is not exact fp32 on this CPU: the switch is never used here")
    from nanoseek.config import get_preset
    from nanoseek.model import Transformer

    cfg = get_preset("tiny")
    model = Transformer(cfg, seed=0).train()
    x = torch.randint(0, cfg.vocab_size, (2, 33))

    def step():
        model.zero_grad(set_to_none=True)
        out = model(x[:, :-1], targets=x[:, 1:], logits=False)
        out.loss.backward()
        return out.loss.detach(), {
            n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
        }

    loss0, grads0 = step()
    with hardware.fast_matmul(True):
        assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"  # the switch is on inside the block
        loss1, grads1 = step()
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-6)
    assert grads1.keys() == grads0.keys()
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-4, atol=1e-6, msg=name)


def test_cpu_peak_names_its_kernels():
    peak, source = hardware.peak_flops(torch.device("cpu"))
    assert peak > 0 and "measured fp32 matmul" in source
    if hardware.fast_matmul_available():
        assert "oneDNN" in source


def test_kernel_choice_reads_the_cpu_not_a_timing(monkeypatch):
    """Every process on a machine must pick the same kernels (bit-identical resume, data-parallel ranks)."""
    if not (_switch_exists() and hardware.onednn_matmul_is_exact()):
        pytest.skip("oneDNN's fp32 matmul is not exact fp32 on this CPU")
    monkeypatch.delenv("NANOSEEK_ONEDNN_MATMUL", raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    for vendor, want in (("AuthenticAMD", True), ("GenuineIntel", False)):
        monkeypatch.setattr(hardware, "_FAST_MATMUL", None)
        monkeypatch.setattr(hardware, "_cpu_vendor", lambda v=vendor: v)
        assert hardware.fast_matmul_available() is want
    monkeypatch.setattr(hardware, "_FAST_MATMUL", None)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(hardware, "_cpu_vendor", lambda: "AuthenticAMD")
    assert hardware.fast_matmul_available() is False


def test_probe_says_no_where_the_switch_is_refused():
    if not _switch_exists():
        pytest.skip("this torch has no oneDNN fp32 matmul switch")

    def refused(a, b):
        raise RuntimeError("bf16 matmul is not supported on this CPU")

    before = torch.backends.mkldnn.matmul.fp32_precision
    assert hardware.onednn_matmul_is_exact(refused) is False
    assert torch.backends.mkldnn.matmul.fp32_precision == before


def test_default_matmul_turns_the_switch_off_inside_fast_matmul():
    if not (_switch_exists() and hardware.onednn_matmul_is_exact()):
        pytest.skip("oneDNN's fp32 matmul is not exact fp32 on this CPU")
    with hardware.fast_matmul(True):
        with hardware.default_matmul():
            assert torch.backends.mkldnn.matmul.fp32_precision == "none"
        assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"


# ---- prepacked weights (hardware.PackedWeight, the decode step's dense matrices) --------------------------
def test_packed_probe_catches_a_bf16_kernel():
    def pack(w, rows_hint):
        return w

    def bf16_mm(x, w):
        return x.bfloat16().float() @ w.bfloat16().float().t()

    def fp32_mm(x, w):
        return (x.double() @ w.double().t()).float()

    def refused(x, w):
        raise RuntimeError("no oneDNN here")

    assert not hardware.packed_is_exact(pack, bf16_mm)
    assert hardware.packed_is_exact(pack, fp32_mm)
    assert not hardware.packed_is_exact(pack, refused)


def test_packed_weight_computes_x_times_w_transposed():
    if not hardware.packed_is_exact():
        pytest.skip("this torch/CPU has no exact prepacked oneDNN linear")
    w = torch.randn(96, 80)
    packed = hardware.PackedWeight(w)
    for rows in (1, 3, 32, 100):  # the layout is chosen for 32 rows; any count works
        x = torch.randn(rows, 80)
        torch.testing.assert_close(packed(x), x @ w.t(), rtol=1e-5, atol=1e-5)


def test_env_turns_packed_weights_off(monkeypatch):
    monkeypatch.setattr(hardware, "_PACKED", None)
    monkeypatch.setenv("NANOSEEK_ONEDNN_MATMUL", "0")
    assert hardware.packed_weights_available() is False
    monkeypatch.setattr(hardware, "_PACKED", None)
    monkeypatch.delenv("NANOSEEK_ONEDNN_MATMUL")
    monkeypatch.setattr(hardware, "_cpu_vendor", lambda: "GenuineIntel")
    assert hardware.packed_weights_available() is False
