"""Like-for-like ablations of DeepSeek-V3's ideas at small scale: `nanoseek ablate`.

Every variant trains on the same data, the same tokens, in the same order, from the same seed; only one switch
changes. Groups:
- attention: MLA vs MHA vs GQA (V2 §2.1, Table 1): validation loss, KV-cache bytes/token, tokens/s.
- ffn: DeepSeekMoE vs a dense SwiGLU with the same activated FFN width (K_r + shared experts) x expert width,
  i.e. about the same FLOPs per token: validation loss at equal tokens (= equal compute) and at equal wall-clock.
- balancing: aux-loss-free bias vs the classic aux loss vs nothing (V3 §2.1.2; Wang et al. 2024): validation loss
  and MaxVio, both per training batch and over the whole validation set (MaxVio_global).
- mtp: MTP D=1 vs off (V3 §2.2): the MAIN next-token validation loss only (MTP is a training signal here).
- precision: the run's precision vs FP8 GEMMs (V3 §3.3, nanoseek/fp8.py; simulated on CPU): validation loss.
  Same model config, so the variant differs in its TrainConfig (`TRAIN_OVERRIDES`), not in a ModelConfig.

Results go to a run folder per variant (resumable: a finished variant is not re-run) and to a Markdown table
with plots. Small-scale results can go either way; the doc says what we measured, negative results included.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from nanoseek.accounting import count_flops, count_params, kv_elements_per_layer  # noqa: E402
from nanoseek.config import ModelConfig  # noqa: E402
from nanoseek.model.moe import max_vio  # noqa: E402
from nanoseek.train.report import machine_info, read_metrics  # noqa: E402
from nanoseek.train.run import PreparedData, build_trainer  # noqa: E402
from nanoseek.train.trainer import TrainConfig  # noqa: E402

GROUPS = ("attention", "ffn", "balancing", "mtp", "precision")
FP8_VARIANT = "FP8 GEMMs (1x128 / 128x128 E4M3)"
TRAIN_OVERRIDES = {FP8_VARIANT: {"precision": "fp8"}}  # variants that change the training, not the model


def variants(base: ModelConfig, group: str) -> dict[str, ModelConfig]:
    if group == "attention":
        heads = base.num_attention_heads
        return {
            "MLA": base,
            "MHA": base.replace(attention="mha"),
            f"GQA ({max(heads // 4, 1)} KV heads)": base.replace(
                attention="gqa", n_kv_heads=max(heads // 4, 1)
            ),
        }
    if group == "ffn":
        width = (base.num_experts_per_tok + base.n_shared_experts) * base.moe_intermediate_size
        return {
            "DeepSeekMoE": base,
            f"dense (d_ff {width})": base.replace(ffn="dense", intermediate_size=width),
        }
    if group == "balancing":
        return {
            "aux-loss-free (bias, gamma 1e-3) + seq-wise 1e-4": base,
            "classic aux loss (alpha 1e-2)": base.replace(balancing="aux_loss"),
            "no balancing": base.replace(balancing="none"),
        }
    if group == "mtp":
        return {
            "MTP D=1 (lambda 0.3)": base.replace(num_nextn_predict_layers=1),
            "no MTP": base.replace(num_nextn_predict_layers=0),
        }
    if group == "precision":
        return {"baseline precision": base, FP8_VARIANT: base}
    raise ValueError(f"groups: unknown group {group!r}; choose from {', '.join(GROUPS)}")


@torch.no_grad()
def global_max_vio(model, batches) -> float | None:
    """MaxVio over a whole validation set (Wang et al.'s MaxVio_global), mean over MoE layers."""
    moes = model.moe_layers()
    if not moes:
        return None
    model.eval()
    for m in moes:
        m.train()  # only the MoE layers: they count their load in training mode (no grad here)
        m.tokens_per_expert.zero_()
    for x, _ in batches:
        model(x.to(model.embed.weight.device))
    vios = [max_vio(m.tokens_per_expert) for m in moes]
    for m in moes:
        m.tokens_per_expert.zero_()
        m.eval()
    return sum(vios) / len(vios)


def _run_key(cfg: ModelConfig, overrides: dict | None = None) -> str:
    """Runs are keyed by their config, so the base model trains once and serves every group."""
    import hashlib

    d = {k: v for k, v in cfg.to_dict().items() if k != "name"} | (overrides or {})
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def run_variant(
    name: str, cfg: ModelConfig, tcfg: TrainConfig, prepared: PreparedData, log
) -> dict[str, Any]:
    out = Path(tcfg.out)
    done = out / "ablation_result.json"
    if done.exists():
        log(f"  {name}: done already ({done})")
        return {**json.loads(done.read_text()), "name": name}
    trainer = build_trainer(cfg, tcfg, prepared, log=lambda *a: None, progress=False)
    trainer.resume()
    result = trainer.fit()
    steps, evals = read_metrics(out)
    timed = steps[3:] or steps
    late = steps[-max(len(steps) // 10, 1) :]
    cfg = trainer.model_cfg
    rec = {
        "name": name,
        "val_loss": evals[-1]["val_loss"],
        "val_bpb": evals[-1].get("val_bpb"),
        "tok_s": sum(r["tok_s"] for r in timed) / len(timed),
        "train_seconds": trainer.train_seconds,
        "params": count_params(cfg).main,
        "activated": count_params(cfg).activated_non_embedding,
        "flops_per_token": count_flops(cfg, tcfg.seq_len).m,
        "kv_bytes_per_token_bf16": kv_elements_per_layer(cfg) * cfg.num_hidden_layers * 2,
        "max_vio_batch": (sum(r["max_vio"] for r in late) / len(late)) if "max_vio" in late[-1] else None,
        "max_vio_global": global_max_vio(trainer.model, trainer.val_batches_fn()),
        "evals": [(e["step"], e["train_seconds"], e["val_loss"]) for e in evals],
        "status": result["status"],
    }
    done.write_text(json.dumps(rec, indent=1))
    log(f"  {name}: val loss {rec['val_loss']:.4f}, {rec['tok_s']:,.0f} tok/s")
    return rec


def _loss_at_time(evals: list, seconds: float) -> float | None:
    """Validation loss linearly interpolated at `seconds` of training time (evals: (step, seconds, loss));
    None before the first evaluation (nothing measured there)."""
    pts = [(t, loss) for _, t, loss in evals]
    if not pts or seconds < pts[0][0]:
        return None
    for (t0, l0), (t1, l1) in zip(pts, pts[1:]):
        if t0 <= seconds <= t1:
            return l0 + (l1 - l0) * (seconds - t0) / max(t1 - t0, 1e-9)
    return pts[-1][1]


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def write_doc(
    results: dict[str, list[dict]],
    base: ModelConfig,
    tcfg: TrainConfig,
    command: str,
    path: Path,
    data_desc: str,
) -> None:
    findings = _findings(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img_dir = path.parent / "img"
    img_dir.mkdir(exist_ok=True)
    lines = [
        "# Ablations",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine_info()}  ",
        f"Data: {data_desc}  ",
        f"Base model: `{base.name}` preset ({base.hidden_size} wide, {base.num_hidden_layers} layers); every variant: "
        f"{tcfg.steps} steps x {tcfg.tokens_per_step:,} tokens = {tcfg.steps * tcfg.tokens_per_step:,} tokens, "
        f"seq {tcfg.seq_len}, seed {tcfg.seed}, same data order.",
        "",
        "Validation loss is nats/token on the held-out documents (every variant shares the tokenizer, so losses "
        "compare directly); bpb = bits per UTF-8 byte.",
        "",
    ]
    lines += ["<!-- findings:intro -->", ""] + ([findings["intro"], ""] if "intro" in findings else [])
    for group, recs in results.items():
        lines += [f"## {group}", ""]
        lines += [
            "| variant | val loss | val bpb | tokens/s | params (non-emb. activated) | train FLOPs/token (M) "
            "| KV bytes/token (bf16) | MaxVio batch | MaxVio global |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in recs:
            lines.append(
                f"| {r['name']} | {r['val_loss']:.4f} | {_fmt(r['val_bpb'], '.4f')} | {r['tok_s']:,.0f} | "
                f"{r['params'] / 1e6:.2f}M ({r['activated'] / 1e6:.2f}M) | {r['flops_per_token'] / 1e6:.1f}M | "
                f"{r['kv_bytes_per_token_bf16']:,} | {_fmt(r['max_vio_batch'], '.3f')} | "
                f"{_fmt(r['max_vio_global'], '.3f')} |"
            )
        if group == "ffn" and len(recs) == 2:
            t = min(r["train_seconds"] for r in recs)
            at = ", ".join(f"{r['name']} {_fmt(_loss_at_time(r['evals'], t), '.4f')}" for r in recs)
            lines += ["", f"At equal wall-clock ({t:.0f} s of training, the faster run's total): {at}."]
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
        for r in recs:
            ev = r["evals"]
            a.plot([e[0] * tcfg.tokens_per_step / 1e6 for e in ev], [e[2] for e in ev], "o-", label=r["name"])
            b.plot([e[1] for e in ev], [e[2] for e in ev], "o-", label=r["name"])
        a.set_xlabel("training tokens (M)")
        b.set_xlabel("training wall-clock (s)")
        for ax in (a, b):
            ax.set_ylabel("validation loss")
            ax.grid(alpha=0.3)
        a.legend(fontsize=8)
        fig.suptitle(f"ablation: {group}")
        fig.tight_layout()
        img = img_dir / f"ablation_{group}.png"
        fig.savefig(img, dpi=100)
        plt.close(fig)
        lines += ["", f"![{group}](img/{img.name})", "", "<!-- findings:" + group + " -->", ""]
        lines += [findings[group], ""] if group in findings else []
    path.write_text("\n".join(lines))


def _findings(path: Path) -> dict[str, str]:
    """The hand-written text after each `<!-- findings:GROUP -->` marker of an existing doc (up to the next `## `
    heading), so regenerating the tables keeps what people wrote about them."""
    if not path.exists():
        return {}
    out = {}
    for m in re.finditer(r"<!-- findings:(\w+) -->\n(.*?)(?=\n## |\Z)", path.read_text(), re.DOTALL):
        if m.group(2).strip():
            out[m.group(1)] = m.group(2).strip()
    return out


def ablate(
    base: ModelConfig,
    tcfg: TrainConfig,
    prepared: PreparedData,
    groups: list[str],
    out: str,
    doc: Path | None,
    command: str,
    log=print,
) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {}
    for group in groups:
        log(f"ablation group: {group}")
        results[group] = []
        for name, cfg in variants(base, group).items():
            overrides = TRAIN_OVERRIDES.get(name, {})
            run_cfg = dataclasses.replace(tcfg, out=str(Path(out) / _run_key(cfg, overrides)), **overrides)
            results[group].append(run_variant(name, cfg, run_cfg, prepared, log))
    if doc is not None:
        write_doc(results, base, tcfg, command, doc, prepared.manifest["source"])
        log(f"wrote {doc}")
    return results
