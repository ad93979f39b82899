"""Training throughput: our training step vs transformers' DeepseekV3ForCausalLM on the identical model and batch.

Issue 3 §6. Both sides run one full optimizer step (forward with loss, backward, AdamW step, zero_grad) in fp32
on the CPU, timed in interleaved rounds, on the same weights (ours saved with `save_hf`, loaded by transformers)
and the same token batch. Defaults are transformers' own: `grouped_mm` experts, `sdpa` attention, fused AdamW (its
Trainer's default for torch >= 2.8; ours uses it too). Ours runs the trainer's path: the fused chunked head +
cross-entropy (nanoseek/model/head_loss.py). MTP is off on
our side (transformers has no MTP training path), our aux-loss-free balancing stays on (its cost is ours to pay).

Kernels: ours runs the step inside `hardware.fast_matmul()`, as the trainer does: fp32 GEMMs on oneDNN where
that is exact and faster than MKL (AVX-512 CPUs; on AVX2 machines nothing changes). transformers runs torch's
defaults, as shipped. For transparency the same transformers step is also timed inside `fast_matmul()`
("transformers+oneDNN"); the ratio against it is printed too.

Model FLOPs per token count every matmul of the step (`accounting.count_flops(...).full`, attention over the
whole l_seq as DeepSeek LLM's M does); MFU divides by the fp32 matmul peak measured in this same process with the
fastest exact kernel available (common.matmul_peak: the faster of MKL and oneDNN). The comparison with
transformers runs the issue's batch (8 x 256); the `small` and `tiny` presets run the trainer's own micro-batch
(`TrainConfig`: 16 x 256), the step `nanoseek train --preset small` takes. `bench_train_ceiling.py` splits that
step into its GEMMs and everything else.
Targets (issue 3): >= 1.3x transformers, and >= 65% of the measured peak on `small`.

    python benchmarks/bench_train.py            # ~2-3 minutes on 2 cores
    python benchmarks/bench_train.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import matmul_peak, print_machine_info, time_interleaved  # noqa: E402

from nanoseek.accounting import count_flops, count_params  # noqa: E402
from nanoseek.config import get_preset  # noqa: E402
from nanoseek.hardware import fast_matmul, fast_matmul_available  # noqa: E402
from nanoseek.model import Transformer  # noqa: E402
from nanoseek.train.optim import make_optimizer  # noqa: E402
from nanoseek.train.trainer import TrainConfig  # noqa: E402


def ours_step(model, opt, x, y):
    def step():
        with fast_matmul():  # as Trainer.train_step
            out = model(x, targets=y, logits=False)  # the trainer's path: fused chunked head + cross-entropy
            out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_balance_bias()

    return step


def hf_step(model, opt, x, y):
    def step():
        out = model(input_ids=x, labels=y)  # transformers shifts labels inside; same token count
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def bench(name: str, cfg, batch: int, seq: int, warmup: int, iters: int, with_hf: bool) -> dict:
    torch.manual_seed(0)
    ours = Transformer(cfg).train()
    opt = make_optimizer(ours, 1e-4)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
    x, y = tokens[:, :-1], tokens[:, 1:]
    fns = {"nanoseek": ours_step(ours, opt, x, y)}
    if with_hf:
        import transformers

        from nanoseek.hf import save_hf

        with tempfile.TemporaryDirectory() as tmp:
            save_hf(ours, tmp)
            hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).train()
        # fused=True: transformers' own default optimizer for torch >= 2.8 ("adamw_torch_fused"), and ours.
        hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
        fns["transformers"] = hf_step(hf, hf_opt, x, x)  # HF labels = inputs (it shifts internally)
        if fast_matmul_available():
            plain = fns["transformers"]

            def with_onednn():
                with fast_matmul():
                    plain()

            fns["transformers+oneDNN"] = with_onednn
    times = time_interleaved(fns, warmup, iters)
    flops_tok = count_flops(cfg, seq).full
    n_tok = batch * seq
    res = {}
    for k, ts in times.items():
        med, best = statistics.median(ts), min(ts)
        res[k] = {"tok_s": n_tok / med, "tok_s_best": n_tok / best, "gflops": n_tok * flops_tok / med / 1e9}
    p = count_params(cfg)
    print(
        f"\n{name}: {p.main / 1e6:.1f}M total / {p.activated_non_embedding / 1e6:.1f}M activated non-embedding, "
        f"batch {batch} x {seq}, {flops_tok / 1e6:.1f} MFLOP/token (full step)"
    )
    for k, r in res.items():
        print(
            f"  {k:13s} {r['tok_s']:8,.0f} tok/s median ({r['tok_s_best']:,.0f} best)  {r['gflops']:6.1f} GFLOP/s"
        )
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    iters, warmup = (3, 1) if args.quick else (8, 2)
    print("machine:")
    print_machine_info()
    peak0, said0 = matmul_peak(2048, 2048, 2048)
    print(f"fp32 matmul peak (2048^3): {said0}")

    # The comparison config: hidden 256, 4 layers, 64 experts top-6, batch 8 x 256 (~25M / 8M).
    cmp_cfg = get_preset("small").replace(num_hidden_layers=4, num_nextn_predict_layers=0, name="small-4L")
    cmp = bench("vs transformers (small, 4 layers, no MTP)", cmp_cfg, 8, 256, warmup, iters, with_hf=True)
    # The presets run at the trainer's own micro-batch (TrainConfig: 16 x 256), what `nanoseek train` does.
    B, T = TrainConfig.batch_size, TrainConfig.seq_len
    small = bench("small preset (6 layers, MTP D=1)", get_preset("small"), B, T, warmup, iters, with_hf=False)
    tiny = bench("tiny preset (2 layers, MTP D=1)", get_preset("tiny"), B, T, warmup, iters, with_hf=False)
    peak1, said1 = matmul_peak(2048, 2048, 2048)
    peak = max(peak0, peak1)
    print(f"\nfp32 matmul peak after: {said1}; using the max, {peak:.1f}")
    ratio = cmp["nanoseek"]["tok_s"] / cmp["transformers"]["tok_s"]
    print(f"\nRESULT ours / transformers training step: {ratio:.2f}x (target >= 1.3x)")
    if "transformers+oneDNN" in cmp:
        r2 = cmp["nanoseek"]["tok_s"] / cmp["transformers+oneDNN"]["tok_s"]
        print(f"RESULT ours / transformers with oneDNN GEMMs too: {r2:.2f}x")
    for name, r in (("small", small), ("tiny", tiny), ("small-4L", cmp)):
        print(
            f"RESULT {name}: {r['nanoseek']['tok_s']:,.0f} tok/s, MFU {r['nanoseek']['gflops'] / peak:.1%} of the "
            "measured fp32 peak (target >= 65% on small)"
        )
    for k in ("transformers", "transformers+oneDNN"):
        if k in cmp:
            print(f"RESULT {k}: MFU {cmp[k]['gflops'] / peak:.1%}")


if __name__ == "__main__":
    main()
