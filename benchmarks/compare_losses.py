"""Compare proxy losses under one protocol: several seeds each, one table of test metrics (mean ± std).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/compare_losses.py [--write-docs]
        [--losses el_nivmf el_nivmf_paper proxy_anchor proxy_nca norm_softmax] [--seeds 0 1 2]
        [--trunk auto|frozen|finetune] [--epochs 0] [--dataset emoji] [--data-root DIR]
        [--output-dir runs/compare] [--feature-cache DIR] [--docs docs/results.md] [--no-train]
        [any other dml.train flag …]

(Use ``OMP_NUM_THREADS=1`` when another process shares the cores: two threads per process on two busy
cores made the training steps about 25× slower.)

Every run is ``python -m dml.train`` with its defaults (validation-selected checkpoint, test split of
classes never seen in training), called in this process through `dml.train.main` with
``--loss NAME --seed K --output-dir OUTPUT/NAME/seedK`` plus the flags given here; flags this script does
not know (``--backbone tiny``, ``--embed-dim 512``, ``--loss-option …``) are passed on to every run.
``--trunk auto`` is dml.train's default: frozen trunk with cached features on a CPU, fine-tuning on a GPU;
``--epochs 0`` is its default too (40 frozen, 20 partial, 30 fine-tuning).

All runs share one ``--feature-cache`` (default ``OUTPUT/features``): with a frozen trunk the trunk
features of every image are computed by the first run and loaded by all the others (the cache key does
not depend on the seed when ``--feature-views`` is 1, the default).

A loss may be a variant with its own loss options, ``LOSS:KEY=VALUE,KEY=VALUE`` (e.g. the ablation
``el_nivmf:guidance_weight=0``): the run gets ``--loss LOSS --loss-option KEY=VALUE …`` and its own
directory (``OUTPUT/el_nivmf+guidance_weight=0``) and table row.

Resuming: a run whose directory holds ``final_metrics.json`` is skipped; one that holds ``last.pt`` but
no ``final_metrics.json`` (interrupted) is continued with ``--resume``. So the same command, run again,
finishes what is missing and rebuilds the table.

The table: for every loss, over its finished seeds, the mean ± sample standard deviation (n − 1) of test
R@1, R@4, MAP@R (cosine), AUROC of κ = ‖e‖ for predicting that the 1-NN is correct
(``final["uncertainty"]["auroc_kappa"]``) and the degradation Spearman ρ between corruption strength and κ
(``final["uncertainty"]["degradation"]["mean_spearman"]``; the paper's claim, that ambiguous images get a
low κ, predicts a negative ρ). The last two only for the losses whose κ is a vMF concentration
(`dml.uncertainty.kappa_is_concentration`: ``el_nivmf``, ``el_nivmf_paper``, …); "—" for the others.
It is printed and written to ``OUTPUT/results.md`` and ``OUTPUT/results.json``; ``--write-docs`` also
replaces the part of ``docs/results.md`` between ``<!-- compare_losses:begin -->`` and
``<!-- compare_losses:end -->`` with it (the prose around it is written by hand). The table holds the
losses and seeds of the command line only; ``--no-train`` rebuilds it from the finished runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: import dml from the repository
    sys.path.insert(0, str(ROOT))

DEFAULT_LOSSES = ("el_nivmf", "el_nivmf_paper", "proxy_anchor", "proxy_nca", "norm_softmax")
DEFAULT_SEEDS = (0, 1, 2)
BEGIN, END = "<!-- compare_losses:begin -->", "<!-- compare_losses:end -->"
# flags this script sets per run itself: passing them through would contradict the protocol
RESERVED = ("--loss", "--seed", "--output-dir", "--resume", "--config")

# (key in results.json, column header, how to read it from final_metrics.json)
METRICS: tuple[tuple[str, str], ...] = (
    ("recall@1", "test R@1"),
    ("recall@4", "R@4"),
    ("map@r", "MAP@R"),
    ("recall@1_cross_domain", "cross-domain R@1"),
    ("auroc_kappa", "AUROC(κ)"),
    ("degradation_spearman", "degradation Spearman"),
)


def read_metric(final: dict[str, Any], key: str) -> float | None:
    """One metric of a run's ``final_metrics.json`` (None where the run has none, e.g. no κ metrics).

    Args:
        final: the parsed ``final_metrics.json``.
        key: a key of `METRICS`.

    Returns:
        The value as a float, or None.
    """
    if key in ("auroc_kappa", "degradation_spearman"):
        uncertainty = final.get("uncertainty") or {}
        if key == "auroc_kappa":
            value = uncertainty.get("auroc_kappa")
        else:
            value = (uncertainty.get("degradation") or {}).get("mean_spearman")
    else:
        value = final.get(key)
    return None if value is None else float(value)


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n − 1; None for fewer than two values) of ``values``."""
    if not values:
        return None, None
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def parse_variant(spec: str) -> tuple[str, list[str]]:
    """A loss or a variant ``LOSS:KEY=VALUE,KEY=VALUE`` as (the loss, its ``--loss-option`` flags).

    Raises:
        ValueError: an option without ``=``.
    """
    loss, _, options = spec.partition(":")
    flags: list[str] = []
    for option in filter(None, (o.strip() for o in options.split(","))):
        if "=" not in option:
            raise ValueError(f"loss variant {spec!r}: option {option!r} is not KEY=VALUE")
        flags += ["--loss-option", option]
    return loss, flags


def run_dir(output: Path, loss: str, seed: int) -> Path:
    """``OUTPUT/<loss>/seed<k>``: the directory of one run (a variant's ``:`` and ``,`` become ``+``)."""
    return output / loss.replace(":", "+").replace(",", "+") / f"seed{seed}"


def train_argv(args: argparse.Namespace, loss: str, seed: int, extra: list[str]) -> list[str]:
    """The ``dml.train`` arguments of one new run (the shared protocol plus ``--loss`` and ``--seed``)."""
    base, options = parse_variant(loss)
    argv = ["--output-dir", str(run_dir(args.output_dir, loss, seed)), "--loss", base, *options, "--seed", str(seed),
            "--trunk", args.trunk, "--epochs", str(args.epochs), "--dataset", args.dataset,
            "--feature-cache", str(args.feature_cache)]
    if args.data_root is not None:
        argv += ["--data-root", str(args.data_root)]
    return argv + list(extra)


def run_all(args: argparse.Namespace, extra: list[str]) -> dict[str, list[str]]:
    """Train every (loss, seed) that has no ``final_metrics.json`` yet.

    Returns:
        ``{"trained": [...], "resumed": [...], "skipped": [...], "failed": [...]}``: run names
        ``loss/seedK`` (a failed one with its exit code).
    """
    from dml.train import main as train_main

    done: dict[str, list[str]] = {"trained": [], "resumed": [], "skipped": [], "failed": []}
    runs = [(loss, seed) for loss in args.losses for seed in args.seeds]
    for i, (loss, seed) in enumerate(runs, 1):
        directory = run_dir(args.output_dir, loss, seed)
        name = f"{loss}/seed{seed}"
        if (directory / "final_metrics.json").is_file():
            print(f"[{i}/{len(runs)}] {name}: finished before, skipped", flush=True)
            done["skipped"].append(name)
            continue
        if (directory / "last.pt").is_file():
            print(f"[{i}/{len(runs)}] {name}: interrupted before, resuming", flush=True)
            argv, kind = ["--resume", str(directory)], "resumed"
        else:
            print(f"[{i}/{len(runs)}] {name}: training", flush=True)
            argv, kind = train_argv(args, loss, seed, extra), "trained"
        t0 = time.time()
        code = train_main(argv)
        if code != 0:
            print(f"[{i}/{len(runs)}] {name}: dml.train exited with {code}", file=sys.stderr, flush=True)
            done["failed"].append(f"{name} (exit {code})")
            if code == 130:  # Ctrl-C: stop here (the same command resumes)
                raise KeyboardInterrupt
            continue
        print(f"[{i}/{len(runs)}] {name}: done in {time.time() - t0:.0f} s", flush=True)
        done[kind].append(name)
    return done


def aggregate(output: Path, losses: list[str], seeds: list[int]) -> dict[str, Any]:
    """Collect the finished runs' ``final_metrics.json`` into per-loss means and standard deviations.

    Args:
        output: the comparison's output directory.
        losses: the losses, in table order.
        seeds: the seeds.

    Returns:
        ``{"losses": {loss: {"seeds": [...], "runs": {seed: {metric: value, ...}},
        "metrics": {metric: {"mean", "std", "n", "values"}}}}}`` for every loss with at least one
        finished seed; a metric no run has (κ metrics of a non-vMF loss) has ``mean`` None.
    """
    from dml.uncertainty import kappa_is_concentration

    table: dict[str, Any] = {}
    for loss in losses:
        runs = {}
        for seed in seeds:
            path = run_dir(output, loss, seed) / "final_metrics.json"
            if not path.is_file():
                continue
            final = json.loads(path.read_text())
            row = {key: read_metric(final, key) for key, _ in METRICS}
            row.update({"recall@1_initial": final.get("recall@1_initial"),
                        "selected_epoch": final.get("selected_epoch"),
                        "last_epoch_recall@1": (final.get("last_epoch") or {}).get("recall@1"),
                        "trunk": final.get("trunk"), "device": final.get("device"),
                        "wall_time_s": final.get("wall_time_s")})
            runs[seed] = row
        if not runs:
            continue
        metrics = {}
        concentration = kappa_is_concentration(parse_variant(loss)[0])
        for key, _ in METRICS:
            values = [r[key] for r in runs.values() if r[key] is not None]
            if key in ("auroc_kappa", "degradation_spearman") and not concentration:
                values = []  # the norm of a non-vMF loss is not an uncertainty
            mean, std = mean_std(values)
            metrics[key] = {"mean": mean, "std": std, "n": len(values), "values": values}
        table[loss] = {"seeds": sorted(runs), "runs": {str(s): r for s, r in runs.items()}, "metrics": metrics}
    return {"losses": table}


def _cell(metric: dict[str, Any]) -> str:
    if metric["mean"] is None:
        return "—"
    if metric["std"] is None:
        return f"{metric['mean']:.3f}"
    return f"{metric['mean']:.3f} ± {metric['std']:.3f}"


def format_table(results: dict[str, Any]) -> str:
    """The markdown table: one row per loss, mean ± std over seeds (bold: the best mean R@1)."""
    losses = results["losses"]
    best = max((v["metrics"]["recall@1"]["mean"] for v in losses.values()
                if v["metrics"]["recall@1"]["mean"] is not None), default=None)
    header = "| `--loss` | seeds | " + " | ".join(title for _, title in METRICS) + " |"
    lines = [header, "|" + "---|" * (len(METRICS) + 2)]
    for loss, entry in losses.items():
        cells = []
        for key, _ in METRICS:
            cell = _cell(entry["metrics"][key])
            if key == "recall@1" and entry["metrics"][key]["mean"] == best:
                cell = f"**{cell}**"
            cells.append(cell)
        seeds = ", ".join(str(s) for s in entry["seeds"])
        lines.append(f"| `{loss}` | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_runs(results: dict[str, Any]) -> str:
    """Per-run details: test R@1 per seed, before training, selected epoch, wall time."""
    lines = ["| `--loss` | seed | test R@1 | before training | selected epoch | R@1 of the last epoch | wall time |",
             "|---|---|---|---|---|---|---|"]
    for loss, entry in results["losses"].items():
        for seed, run in entry["runs"].items():
            def fmt(v):
                return "—" if v is None else f"{v:.3f}"
            wall = run.get("wall_time_s")
            lines.append(f"| `{loss}` | {seed} | {fmt(run['recall@1'])} | {fmt(run['recall@1_initial'])} | "
                         f"{run['selected_epoch']} | {fmt(run['last_epoch_recall@1'])} | "
                         f"{'—' if wall is None else f'{wall:.0f} s'} |")
    return "\n".join(lines)


def render(results: dict[str, Any]) -> str:
    """The block written to ``OUTPUT/results.md`` and between the markers of ``docs/results.md``."""
    meta = results["meta"]
    return (
        f"{format_table(results)}\n\n"
        f"Mean ± sample standard deviation over the seeds; test split, validation-selected checkpoint; "
        f"trunk `{meta['trunk']}` on `{meta['device']}`, epochs: {meta['epochs']}; AUROC(κ) and the degradation "
        f"Spearman only where κ = ‖e‖ is a vMF concentration. Generated by `benchmarks/compare_losses.py` "
        f"on {meta['date']}.\n\n"
        f"Per run:\n\n{format_runs(results)}\n"
    )


def replace_between_markers(text: str, block: str) -> str:
    """``text`` with what lies between `BEGIN` and `END` replaced by ``block``.

    Raises:
        ValueError: if the markers are missing, repeated or out of order.
    """
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"expected one {BEGIN} followed by one {END}")
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    return f"{head}{BEGIN}\n{block.rstrip()}\n{END}{tail}"


def _meta(args: argparse.Namespace, results: dict[str, Any], extra: list[str], started: float) -> dict[str, Any]:
    import torch

    runs = [r for entry in results["losses"].values() for r in entry["runs"].values()]
    trunks = sorted({str(r["trunk"]) for r in runs}) or [args.trunk]
    devices = sorted({str(r["device"]) for r in runs}) or ["?"]
    epochs = args.epochs
    if runs:  # the epochs the runs actually trained (0 means dml.train's default)
        configs = [json.loads(p.read_text()) for loss in results["losses"]
                   for p in sorted((args.output_dir / loss).glob("seed*/config.json"))]
        epochs = ", ".join(str(e) for e in sorted({c.get("epochs") for c in configs})) or epochs
    return {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["benchmarks/compare_losses.py", *sys.argv[1:]]) if sys.argv else "",
        "losses": list(args.losses), "seeds": list(args.seeds), "dataset": args.dataset,
        "trunk": ", ".join(trunks), "device": ", ".join(devices), "epochs": epochs, "extra_train_args": extra,
        "machine": f"{platform.machine()}, {platform.processor() or platform.system()}",
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "this_invocation_s": round(time.time() - started, 1),
        "sum_of_run_wall_times_s": round(sum(r["wall_time_s"] or 0.0 for r in runs), 1),
    }


def build_parser() -> argparse.ArgumentParser:
    """The command line (unknown flags are passed on to every ``dml.train`` run)."""
    parser = argparse.ArgumentParser(
        allow_abbrev=False,  # --seed / --loss are dml.train flags, not abbreviations of --seeds / --losses
        description="Train several losses × seeds with python -m dml.train under one protocol and tabulate the "
                    "test metrics (mean ± std). Unknown flags are passed on to every dml.train run.")
    parser.add_argument("--losses", nargs="+", default=list(DEFAULT_LOSSES), help="losses to compare")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(DEFAULT_SEEDS), help="training seeds")
    parser.add_argument("--trunk", default="auto", choices=("auto", "frozen", "partial", "finetune"),
                        help="dml.train --trunk (auto: frozen on CPU, fine-tuning on GPU)")
    parser.add_argument("--epochs", type=int, default=0, help="dml.train --epochs (0: its default, 40 frozen / 20 "
                                                              "partial / 30 fine-tuning)")
    parser.add_argument("--dataset", default="emoji", help="dml.train --dataset")
    parser.add_argument("--data-root", default=None, help="dml.train --data-root")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/compare"),
                        help="runs go to OUTPUT/<loss>/seed<k>; results.md and results.json to OUTPUT")
    parser.add_argument("--feature-cache", type=Path, default=None,
                        help="shared frozen-trunk feature cache (default OUTPUT/features)")
    parser.add_argument("--write-docs", action="store_true",
                        help="replace the marked section of --docs with the table")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "results.md", help="the page --write-docs edits")
    parser.add_argument("--no-train", action="store_true", help="only aggregate the finished runs")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the comparison; returns 0 when every run finished, 1 when some failed, 2 on a usage error."""
    started = time.time()
    parser = build_parser()
    args, extra = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    bad = [a for a in extra if a.split("=")[0] in RESERVED]
    if bad:
        parser.error(f"{', '.join(bad)}: set by this script for every run")
    from dml.uncertainty import kappa_is_concentration

    try:
        for loss in args.losses:
            kappa_is_concentration(parse_variant(loss)[0])  # unknown losses and bad variants fail here
    except ValueError as err:
        parser.error(str(err))
    if args.feature_cache is None:
        args.feature_cache = args.output_dir / "features"
    args.output_dir.mkdir(parents=True, exist_ok=True)

    done = {"trained": [], "resumed": [], "skipped": [], "failed": []}
    if not args.no_train:
        try:
            done = run_all(args, extra)
        except KeyboardInterrupt:
            print("\ninterrupted: run the same command again to continue where it stopped", file=sys.stderr)
            return 130
    results = aggregate(args.output_dir, list(args.losses), list(args.seeds))
    if not results["losses"]:
        print("no finished run to tabulate", file=sys.stderr)
        return 1
    results["meta"] = _meta(args, results, extra, started)
    results["meta"]["runs"] = done
    block = render(results)
    print("\n" + block)
    (args.output_dir / "results.md").write_text(
        f"# Loss comparison\n\n`{results['meta']['command']}`\n\n{block}", encoding="utf-8")
    (args.output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.output_dir / 'results.md'} and {args.output_dir / 'results.json'}")
    if args.write_docs:
        text = args.docs.read_text(encoding="utf-8")
        args.docs.write_text(replace_between_markers(text, block), encoding="utf-8")
        print(f"updated the table in {args.docs}")
    missing = [f"{loss}/seed{s}" for loss in args.losses for s in args.seeds
               if not (run_dir(args.output_dir, loss, s) / "final_metrics.json").is_file()]
    if missing:
        print(f"not finished: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
