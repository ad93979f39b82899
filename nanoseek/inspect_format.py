"""Text rendering of `nanoseek inspect`: the per-model report and the side-by-side table.

The numbers come from nanoseek.accounting.inspect_report (a plain dict, also written as JSON); this module only
lays them out, so the conventions documented there are the ones printed here.
"""

from __future__ import annotations

from nanoseek.accounting import KV_BYTES


def human(n: float) -> str:
    """671026419200 -> '671.03B'; 1.5e6 -> '1.50M'."""
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}"
    return f"{n:.0f}" if float(n).is_integer() else f"{n:.3g}"


def _count(n: int) -> str:
    return f"{n:>19,}  {human(n):>8}"


def _bytes(n: float) -> str:
    for div, suffix in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= div:
            return f"{n / div:.2f} {suffix}"
    return f"{n:.0f} B"


def flop(n: float) -> str:
    """SI-prefixed FLOPs: 225.31e9 -> '225.31 GFLOP'."""
    for div, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f} {prefix}FLOP"
    return f"{n:.0f} FLOP"


def _amount(x: float) -> str:
    """Thousands separators for big amounts, 3 significant digits for small ones (tiny models)."""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _rows(rows: list[tuple[str, str]], indent: str = "  ") -> list[str]:
    """Label/value lines with the values aligned."""
    width = max(len(label) for label, _ in rows)
    return [f"{indent}{label:<{width}}  {value}" for label, value in rows]


def _table(header: list[str], rows: list[list[str]], indent: str = "") -> list[str]:
    """Columns sized to fit: the first left-aligned, the rest right-aligned."""
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    align = [str.ljust] + [str.rjust] * (len(header) - 1)
    return [indent + "  ".join(a(x, w) for a, x, w in zip(align, row, widths)) for row in [header, *rows]]


CONVENTION_NAMES = {"6n": "6 N_act", "m": "M (DeepSeek LLM)", "full": "all matmuls"}


def format_report(r: dict) -> str:
    c, p, a, f, kv, cost = (
        r[k] for k in ("config", "params", "activated", "flops_per_token", "kv_cache", "cost")
    )
    L = c["layers"]
    ffn = "dense FFN"
    if c["ffn"] == "moe":
        ffn = f"MoE FFN in {c['moe_layers']} of {L} layers ({c['routed_experts']} routed, "
        ffn += f"top-{c['experts_per_token']}, {c['shared_experts']} shared)"
    out = [
        f"{r['name']}: {L} layers, d={c['hidden_size']}, {c['attention']} attention, {ffn}, "
        f"MTP depth {c['mtp_depth']}, vocab {c['vocab_size']:,}",
        "",
        "Parameters (stored elements, counted on the meta device: parameters + the routing-bias buffer)",
    ]
    out += _rows(
        [
            ("main model", _count(p["main"])),
            ("  embedding", _count(p["embedding"])),
            ("  output head", _count(p["head"]) + ("  (tied)" if p["head"] == 0 else "")),
            (f"  attention ({L} layers)", _count(p["attention"])),
            ("  dense FFN", _count(p["dense_ffn"])),
            ("  routed experts", _count(p["routed_experts"])),
            ("  shared experts", _count(p["shared_experts"])),
            ("  router (gate + bias)", _count(p["router"])),
            ("  norms", _count(p["norms"])),
            (f"MTP (D={p['n_mtp']}, unique)", _count(p["mtp"])),
            ("main + MTP", _count(p["with_mtp"])),
            ("MTP as stored (+ dup. embedding, head)", _count(p["mtp_stored"])),
            ("main + MTP as stored (HF checkpoint)", _count(p["with_mtp_stored"])),
        ]
    )
    out += ["", "Activated per token (each MoE layer: top-K routed + shared experts + router)"]
    out += _rows(
        [
            ("incl. embedding + head", _count(a["with_embedding_and_head"])),
            ("excl. input embedding (a lookup)", _count(a["without_input_embedding"])),
            ("excl. embedding + head", _count(a["without_embedding_and_head"])),
            ("MTP, unique", _count(a["mtp_unique"])),
            ("MTP, incl. shared embedding + head", _count(a["mtp_with_shared_embedding_and_head"])),
        ]
    )
    out += [
        "",
        "Training FLOPs per token (1 multiply-add = 2 FLOPs; training = 3 x forward;",
        f"  attention: every query against all l_seq = {f['seq_len']:,} keys, no causal halving)",
    ]
    out += _rows(
        [
            ("6 N_act (incl. embedding + head)", f"{flop(f['six_n_act']):>15}"),
            ("6 N_act non-embedding (DeepSeek LLM 6N1)", f"{flop(f['six_n_non_embedding']):>15}"),
            ("M (DeepSeek LLM eq. 2: non-embedding + attention)", f"{flop(f['m']):>15}"),
            ("all matmuls: M + head + MTP", f"{flop(f['full']):>15}"),
        ]
    )
    out += ["", f"KV cache per token (BF16, {L} layers; * = what this model caches)"]
    header = ["kind", "per layer", "per token", "bytes/token", "x MLA", f"at {kv['context']:,} tokens"]
    rows = [
        [
            row["kind"] + (" *" if row["kind"] == kv["this_kind"] else ""),
            f"{row['per_layer']:,}",
            f"{row['per_token']:,}",
            f"{row['bytes_per_token']:,}",
            f"{row['ratio_to_mla']:.1f}x",
            _bytes(row["bytes_at_context"]),
        ]
        for row in kv["rows"]
    ]
    out += _table(header, rows, indent="  ")
    conv, pub = CONVENTION_NAMES[cost["convention"]], r["published_v3"]
    out += [
        "",
        f"Training cost: {human(cost['tokens'])} tokens ({cost['token_source']}) on {cost['gpu']}"
        f" ({cost['precision'].upper()} peak {cost['peak_tflops']:,.0f} TFLOP/s)",
    ]
    out += _rows(
        [
            ("FLOPs", f"{conv} = {flop(cost['flops_per_token'])}/token, {cost['total_flops']:.3e} in all"),
            ("MFU", f"{cost['mfu']:.1%} ({cost['mfu_source']})"),
            ("achieved per GPU", f"{cost['achieved_tflops']:,.1f} TFLOP/s"),
            ("GPU-hours", f"{_amount(cost['gpu_hours'])}  ({human(cost['gpu_hours'])})"),
            (f"wall-clock on {cost['n_gpus']:,} GPUs", f"{_amount(cost['days'])} days"),
            ("energy (GPU board power only)", f"{_amount(cost['energy_kwh'])} kWh"),
            (f"at ${cost['price_per_gpu_hour']:,.2f}/GPU-hour", f"${_amount(cost['dollars'])}"),
            (
                "published, DeepSeek-V3",
                f"{pub['gpu_hours']:,} H800 GPU-hours = ${pub['dollars']:,.0f} [V3 Table 1]",
            ),
            (
                "  implied MFU",
                f"{pub['implied_mfu_bf16']:.1%} of BF16 / {pub['implied_mfu_fp8']:.1%} of FP8 peak"
                f" under {conv};",
            ),
            (
                "",
                f"pre-training alone ({pub['pretrain_gpu_hours']:,} h):"
                f" {pub['implied_mfu_bf16_pretrain_only']:.1%} of BF16",
            ),
        ]
    )
    return "\n".join(out)


def format_table(reports: list[dict]) -> str:
    """One line per model: the compact view of `inspect --all`."""
    header = [
        "model",
        "total",
        "+MTP",
        "activated",
        "non-emb. act.",
        "6N_act/tok",
        "M/tok",
        "KV B/tok",
        "GPU-hours",
    ]
    rows = [
        [
            r["name"],
            human(r["params"]["main"]),
            human(r["params"]["mtp"]),
            human(r["activated"]["with_embedding_and_head"]),
            human(r["activated"]["without_embedding_and_head"]),
            flop(r["flops_per_token"]["six_n_act"]),
            flop(r["flops_per_token"]["m"]),
            f"{r['kv_cache']['this_model'] * r['kv_cache']['layers'] * KV_BYTES:,}",
            f"{human(r['cost']['gpu_hours'])} @ {human(r['cost']['tokens'])} tok",
        ]
        for r in reports
    ]
    notes = [
        "",
        "activated incl. embedding + head; training FLOPs per token (3 x forward), M at each model's l_seq;",
        "KV cache in BF16 over all layers; GPU-hours at the MFU and GPU that `inspect --preset NAME` shows.",
    ]
    return "\n".join(_table(header, rows) + notes)
