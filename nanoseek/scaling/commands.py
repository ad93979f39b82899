"""`nanoseek scaling sweep | hparams | fit`: the command-line face of nanoseek/scaling (see docs/scaling.md).

Each handler parses flags, prepares the data once (so parallel runs never race to train the tokenizer), plans
runs, hands them to the runner and the fits. torch-heavy modules are imported inside the handlers.
"""

from __future__ import annotations

import argparse
import sys

from nanoseek.argtypes import UsageError, fraction, non_negative_number, positive_int, positive_number

DEFAULT_BUDGETS = "3e10,1e11,3e11"  # the committed CPU sweep (docs/scaling.md)
DEFAULT_HPARAM_BUDGETS = "3e10,1e11,3e11"
_DATA_HELP = "a corpus (text file, folder, JSONL, parquet) or 'default' for Shakespeare's complete works"


def number_list(text: str) -> list[float]:
    """'1e11,3e11,1T' -> [1e11, 3e11, 1e12]: positive numbers, K/M/B/T suffixes allowed."""
    items = [t for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated numbers, e.g. 1e11,3e11,1e12")
    return [positive_number(t) for t in items]


def _command() -> str:
    return "nanoseek " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["scaling"] else "nanoseek scaling"


def _add_run_flags(p, budgets: str, out: str) -> None:
    p.add_argument(
        "--budgets",
        type=number_list,
        default=number_list(budgets),
        help=f"compute budgets C in FLOPs ({budgets})",
    )
    f = p.add_argument_group("model family (nanoseek/scaling/family.py)")
    f.add_argument("--family", choices=("dense", "mla", "moe"), default="dense", help="architecture (dense)")
    f.add_argument("--aspect", type=positive_number, default=32.0, help="d_model / n_layer of the rule (32)")
    f.add_argument("--head-dim", type=positive_int, default=8, help="width of every head (8)")
    f.add_argument("--seq-len", type=positive_int, default=128, help="l_seq, for training and M (128)")
    r = p.add_argument_group("runs")
    r.add_argument("--data", default="default", metavar="PATH|default", help=_DATA_HELP)
    r.add_argument(
        "--vocab-size", type=positive_int, default=512, help="BPE vocabulary trained on the data (512)"
    )
    r.add_argument("--seed", type=int, default=1337, help="seed of every run (1337)")
    r.add_argument("--device", default="auto", help="auto | cpu | cuda (auto)")
    r.add_argument("--warmup-frac", type=fraction, default=0.05, help="warmup as a fraction of steps (0.05)")
    r.add_argument("--min-steps", type=positive_int, default=50, help="leave out runs shorter than this (50)")
    r.add_argument("--jobs", type=positive_int, default=1, help="runs in parallel, one process each (1)")
    r.add_argument(
        "--threads", type=positive_int, help="torch threads per run (default 1; use --jobs for more cores)"
    )
    r.add_argument("--out", default=out, metavar="DIR", help=f"sweep folder: results, runs, report ({out})")
    r.add_argument("--dry-run", action="store_true", help="print the plan and stop")


def _prepare(args):
    """Family, run settings and what the report says about the data, with the data tokenized once up front."""
    from nanoseek.scaling.family import Family
    from nanoseek.scaling.sweep import RunSettings
    from nanoseek.train.run import prepare_data

    prepared = prepare_data(args.data, None, args.vocab_size, log=lambda *a: print(*a, file=sys.stderr))
    family = Family(args.family, args.aspect, args.head_dim, args.seq_len, prepared.tokenizer.vocab_size)
    settings = RunSettings(
        data=args.data,
        vocab_size=args.vocab_size,
        data_id=prepared.data_dir.name,
        seed=args.seed,
        device=args.device,
        warmup_frac=args.warmup_frac,
        min_steps=args.min_steps,
    )
    return (
        family,
        settings,
        {
            "train_tokens": prepared.manifest["splits"]["train"]["tokens"],
            "data_source": prepared.manifest["source"],
        },
    )


def _print_plan(specs, notes) -> None:
    print(f"{'C':>8} {'model':>16} {'M':>9} {'D':>10} {'batch':>6} {'lr':>8} {'steps':>6}")
    for s in specs:
        print(
            f"{s.budget:8.3g} {s.model['name']:>16} {s.m:9.3g} {s.tokens:10.3g} {s.batch_size:6d} {s.lr:8.3g} {s.steps:6d}"
        )
    for n in notes:
        print(f"note: {n}")


# ---- sweep ---------------------------------------------------------------------------------------------------
def add_sweep_parser(sub) -> None:
    p = sub.add_parser(
        "sweep",
        help="IsoFLOP sweep: several model sizes per compute budget, then the fits and report",
        description="For each budget C, train ~6-10 sizes M of one family on D = C/M tokens with batch and LR "
        "from DeepSeek LLM eq. 1 (or --hparams), one process per run (--jobs in parallel); results in "
        "OUT/results.jsonl keyed by config, so a re-run skips finished runs and resumes interrupted ones. Then fit "
        "and write OUT/scaling_report.md (as `nanoseek scaling fit`).",
    )
    _add_run_flags(p, DEFAULT_BUDGETS, "runs/scaling")
    p.add_argument("--sizes", type=positive_int, default=5, help="model sizes per budget (5)")
    p.add_argument(
        "--span", type=positive_number, default=4.0, help="sizes span centre/span..centre*span (4)"
    )
    p.add_argument(
        "--center",
        type=positive_number,
        default=2.0,
        help="centre of the sizes = this x DeepSeek LLM eq. 4's M_opt(C) (2: small models gain from the "
        "uncounted embedding and head)",
    )
    p.add_argument(
        "--hparams", metavar="JSON", help="a fitted law (hparams_law.json) instead of DeepSeek's eq. 1"
    )
    p.add_argument("--boot", type=positive_int, default=1000, help="bootstrap resamples of the fit (1000)")
    p.add_argument("--no-fit", action="store_true", help="only run; fit later with `nanoseek scaling fit`")


def cmd_sweep(args: argparse.Namespace) -> int:
    from nanoseek.scaling.fit import FitError
    from nanoseek.scaling.laws import DEEPSEEK_HPARAMS, DEEPSEEK_M_OPT, HparamLaw, PowerLaw
    from nanoseek.scaling.report import analyze
    from nanoseek.scaling.sweep import plan_isoflop, run_sweep, save_plan

    law = HparamLaw.load(args.hparams) if args.hparams else DEEPSEEK_HPARAMS
    family, settings, data_info = _prepare(args)
    center = PowerLaw(DEEPSEEK_M_OPT.coef * args.center, DEEPSEEK_M_OPT.exp)
    specs, notes = plan_isoflop(family, args.budgets, settings, args.sizes, args.span, center, law)
    _print_plan(specs, notes)
    if args.dry_run or not specs:
        return 0
    save_plan(args.out, family, settings, law, specs, command=_command(), **data_info)
    records = run_sweep(specs, args.out, jobs=args.jobs, threads=args.threads)
    failed = [r for r in records if r["status"] == "failed"]
    if args.no_fit:
        return 1 if failed else 0
    try:
        a = analyze(args.out, n_boot=args.boot, command=_command())
    except FitError as e:
        print(f"nanoseek: not fitted yet: {e}", file=sys.stderr)
        return 1 if failed else 0
    _print_fit(a, args.out)
    return 1 if failed else 0


def _print_fit(a, folder) -> None:
    f = a.fit
    print(
        f"IsoFLOP: M_opt = {f.m_opt.coef:.4g} C^{f.a:.4f} [{f.a_ci[0]:.3f}, {f.a_ci[1]:.3f}], "
        f"D_opt = {f.d_opt.coef:.4g} C^{f.b:.4f} ({f.ci:.0%} CI); DeepSeek LLM: 0.1715 C^0.5243, 5.8316 C^0.4757"
    )
    if a.parametric:
        p = a.parametric
        print(
            f"parametric: E={p.E:.3f} A={p.A:.3g} B={p.B:.3g} alpha={p.alpha:.3f} beta={p.beta:.3f} -> a={p.a:.3f}"
        )
    else:
        print(f"parametric: not fitted: {a.parametric_error}")
    if a.prediction:
        pr = a.prediction
        print(f"at C={pr['compute']:.3g}: M_opt {pr['m_opt']:.3g}, predicted loss {pr['loss']:.4f}", end="")
        c = a.check
        print(f", measured {c[a.metric]:.4f}" if c and c.get(a.metric) is not None else "")
    print(f"report: {folder}/scaling_report.md")


# ---- fit ---------------------------------------------------------------------------------------------------------
def add_fit_parser(sub) -> None:
    p = sub.add_parser(
        "fit",
        help="fit a sweep: IsoFLOP parabolas, M_opt/D_opt power laws, approach 3, frontier; report + plots",
        description="Read OUT/sweep.json and OUT/results.jsonl, fit, plot and write scaling_report.md. "
        "--extrapolate C predicts the compute-optimal model and loss at C; --check also trains that model there.",
    )
    p.add_argument("--out", default="runs/scaling", metavar="DIR", help="the sweep folder (runs/scaling)")
    p.add_argument(
        "--metric", choices=("val_bpb", "val_loss"), default="val_bpb", help="what is fitted (val_bpb)"
    )
    p.add_argument("--boot", type=positive_int, default=1000, help="bootstrap resamples (1000)")
    p.add_argument("--extrapolate", type=positive_number, metavar="C", help="predict at this larger budget")
    p.add_argument(
        "--check", action="store_true", help="train the predicted compute-optimal model at --extrapolate"
    )
    p.add_argument("--threads", type=positive_int, help="torch threads of the check run")
    p.add_argument("--report", metavar="DIR", help="write the report and plots here (default: --out)")


def cmd_fit(args: argparse.Namespace) -> int:
    from nanoseek.scaling.report import analyze

    if args.check and not args.extrapolate:
        raise UsageError("--check needs --extrapolate C (the budget to check at)")
    a = analyze(
        args.out,
        metric=args.metric,
        n_boot=args.boot,
        extrapolate=args.extrapolate,
        run_check=args.check,
        report_dir=args.report,
        command=_command(),
        threads=args.threads,
    )
    _print_fit(a, args.report or args.out)
    return 0 if not (a.check and a.check.get("status") == "failed") else 1


# ---- hparams -------------------------------------------------------------------------------------------------
def add_hparams_parser(sub) -> None:
    p = sub.add_parser(
        "hparams",
        help="grid over batch size and learning rate at a few budgets; fit eta_opt(C), B_opt(C)",
        description="At each budget, train the family member DeepSeek LLM eq. 4 calls compute-optimal at every "
        "(batch, LR) of a grid of factors around DeepSeek's eq. 1; fit power laws through the settings within "
        "--band of the best (0.25%, as DeepSeek LLM §3.1). Writes OUT/hparams_report.md, hparams.png and "
        "hparams_law.json (for `nanoseek scaling sweep --hparams`).",
    )
    _add_run_flags(p, DEFAULT_HPARAM_BUDGETS, "runs/scaling-hparams")
    p.add_argument("--lr-factors", type=number_list, default=[0.25, 0.5, 1, 2, 4], help="x eta(C) (0.25..4)")
    p.add_argument("--batch-factors", type=number_list, default=[0.25, 0.5, 1, 2, 4], help="x B(C) (0.25..4)")
    p.add_argument("--band", type=non_negative_number, default=0.0025, help="near-optimal band (0.0025)")
    p.add_argument(
        "--metric", choices=("val_bpb", "val_loss"), default="val_bpb", help="what is fitted (val_bpb)"
    )


def cmd_hparams(args: argparse.Namespace) -> int:
    from pathlib import Path

    from nanoseek.scaling.hparams import fit_records, plan_hparams
    from nanoseek.scaling.laws import DEEPSEEK_HPARAMS
    from nanoseek.scaling.report import write_hparams_report
    from nanoseek.scaling.sweep import run_sweep, save_plan

    family, settings, data_info = _prepare(args)
    specs, notes = plan_hparams(family, args.budgets, settings, args.lr_factors, args.batch_factors)
    _print_plan(specs, notes)
    if args.dry_run or not specs:
        return 0
    save_plan(args.out, family, settings, DEEPSEEK_HPARAMS, specs, command=_command(), **data_info)
    records = run_sweep(specs, args.out, jobs=args.jobs, threads=args.threads)
    fit = fit_records(records, args.metric, args.band)
    path = write_hparams_report(fit, Path(args.out), args.metric, _command())
    law = fit.law
    print(
        f"eta_opt = {law.eta.coef:.4g} C^{law.eta.exp:.4f}, B_opt = {law.batch_tokens.coef:.4g} C^{law.batch_tokens.exp:.4f} "
        f"tokens (DeepSeek LLM: 0.3118 C^-0.1250, 0.2920 C^0.3271); report: {path}"
    )
    return 1 if any(r["status"] == "failed" for r in records) else 0


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "scaling",
        help="scaling laws: IsoFLOP sweeps, compute-optimal fits, hyperparameter laws",
        description="Scaling-law experiments in DeepSeek LLM's method (arXiv 2401.02954 §3). See docs/scaling.md.",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    add_sweep_parser(actions)
    add_fit_parser(actions)
    add_hparams_parser(actions)
    p.set_defaults(func=cmd_scaling)


def cmd_scaling(args: argparse.Namespace) -> int:
    actions = {"sweep": cmd_sweep, "fit": cmd_fit, "hparams": cmd_hparams}
    if args.action not in actions:
        raise UsageError("choose a scaling action: sweep, fit or hparams")
    try:
        return actions[args.action](args)
    except KeyboardInterrupt:  # the runner has stopped its runs and said how to resume
        return 130
