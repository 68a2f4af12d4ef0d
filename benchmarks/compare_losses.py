"""Compare proxy losses under one protocol: several seeds each, one table of test metrics (mean ± std).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/compare_losses.py [--write-docs]
        [--losses el_nivmf el_nivmf_paper proxy_anchor proxy_nca norm_softmax] [--seeds 0 1 2]
        [--trunk auto|frozen|partial|finetune] [--epochs 0] [--dataset emoji] [--data-root DIR]
        [--output-dir runs/compare] [--feature-cache DIR] [--docs docs/results.md] [--no-train]
        [--search-lr 5e-5 1e-4 2e-4 4e-4] [--search-seed 0]
        [any other dml.train flag …]

(Use ``OMP_NUM_THREADS=1`` when another process shares the cores: two threads per process on two busy
cores made the training steps about 25× slower.)

Every run is ``python -m dml.train`` with its defaults (validation-selected checkpoint, test split of
classes never seen in training), called in this process through `dml.train.main` with
``--loss NAME --seed K --output-dir OUTPUT/NAME/seedK`` plus the flags given here; flags this script does
not know (``--backbone tiny``, ``--embed-dim 512``, ``--loss-option …``) are passed on to every run.
``--trunk auto`` is dml.train's default: the partial trunk (last stage and head on cached activations) on a
CPU, fine-tuning on a GPU;
``--epochs 0`` is its default too (40 frozen, 20 partial, 30 fine-tuning).

All runs share one ``--feature-cache`` (default ``OUTPUT/features``): with a frozen or partial trunk the trunk
features of every image are computed by the first run and loaded by all the others (the cache key does
not depend on the seed when ``--feature-views`` is 1, the default).

A loss may be a variant with its own loss options, ``LOSS:KEY=VALUE,KEY=VALUE`` (e.g. the ablation
``el_nivmf:guidance_weight=0``): the run gets ``--loss LOSS --loss-option KEY=VALUE …`` and its own
directory (``OUTPUT/el_nivmf+guidance_weight=0``) and table row.

Hyperparameter search (``--search-lr LR …``): before the seeds, every loss is trained once per listed
base learning rate (``dml.train --lr``; the head, the trunk and the loss's own groups scale with it) with
``--search-seed`` and its default options, in ``OUTPUT/search/<loss>/lr<LR>``; the learning rate whose
run reached the highest **validation** R@1 (at its selected epoch; ties go to the smaller rate) is the
one its seeds are trained with. The test split plays no part in the choice. Every loss gets the same
budget, one run per listed rate. A variant ``LOSS:KEY=VALUE`` is not searched: it takes the rate chosen
for ``LOSS`` (an ablation changes one thing of the tuned loss). The search is a table of its own in
the output.

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
# a flag the search sets per run: passing it through as well would contradict the search
SEARCHED = ("--lr",)

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


#: rejected fractions shown in the accuracy–rejection table (points of the runs' ``rejection_curve``)
REJECTION_POINTS = (0.0, 0.2, 0.5, 0.8)
#: corruption kinds of the degradation test, in table order
DEGRADATIONS = ("blur", "downsample", "occlude")


def uncertainty_details(final: dict[str, Any]) -> dict[str, float | None]:
    """Recall@1 after rejecting the `REJECTION_POINTS` fractions of least-confident queries
    (``rejection@F``) and the Spearman ρ of κ with each corruption's strength (``spearman_<kind>``);
    None where the run has no uncertainty evaluation or no such point."""
    uncertainty = final.get("uncertainty") or {}
    curve = {round(float(f), 6): float(r) for f, r in uncertainty.get("rejection_curve") or []}
    kinds = (uncertainty.get("degradation") or {}).get("kinds") or {}
    row: dict[str, float | None] = {f"rejection@{f:g}": curve.get(round(f, 6)) for f in REJECTION_POINTS}
    for kind in DEGRADATIONS:
        value = (kinds.get(kind) or {}).get("spearman")
        row[f"spearman_{kind}"] = None if value is None else float(value)
    return row


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


def search_dir(output: Path, loss: str, lr: float) -> Path:
    """``OUTPUT/search/<loss>/lr<LR>``: the directory of one search run."""
    return output / "search" / loss / f"lr{lr!r}"


def train_argv(args: argparse.Namespace, loss: str, seed: int, extra: list[str], *,
               directory: Path | None = None, lr: float | None = None) -> list[str]:
    """The ``dml.train`` arguments of one new run (the shared protocol plus ``--loss``, ``--seed`` and,
    when searched, ``--lr``); ``directory`` defaults to `run_dir`."""
    base, options = parse_variant(loss)
    directory = run_dir(args.output_dir, loss, seed) if directory is None else directory
    argv = ["--output-dir", str(directory), "--loss", base, *options, "--seed", str(seed),
            "--trunk", args.trunk, "--epochs", str(args.epochs), "--dataset", args.dataset,
            "--feature-cache", str(args.feature_cache)]
    if args.data_root is not None:
        argv += ["--data-root", str(args.data_root)]
    if lr is not None:
        argv += ["--lr", repr(lr)]  # every digit: the run's config.json must hold this very rate
    return argv + list(extra)


#: the file a failed search run leaves (its exit code): it counts as finished, without a score
FAILED_MARKER = "search_failed.json"


def validation_score(directory: Path) -> float | None:
    """The validation score of a finished run at its selected epoch (None: not finished, or failed).

    The score is the run's ``--selection-metric`` (``config.json``; default R@1) read from
    ``history.jsonl`` (the per-epoch validation metrics) at ``final_metrics.json``'s ``selected_epoch``:
    the number the run's own checkpoint selection maximised.

    Raises:
        ValueError: the run finished but has no validation metrics at its selected epoch (e.g. it had no
            validation split, ``--val-fraction 0``; a search needs one).
    """
    final_path = directory / "final_metrics.json"
    if not final_path.is_file():
        return None
    epoch = json.loads(final_path.read_text()).get("selected_epoch")
    metric = json.loads((directory / "config.json").read_text()).get("selection_metric", "recall@1")
    history = directory / "history.jsonl"
    for line in (history.read_text().splitlines() if history.is_file() else []):
        record = json.loads(line)
        if record.get("epoch") == epoch and (record.get("val") or {}).get(metric) is not None:
            return float(record["val"][metric])
    raise ValueError(f"{directory}: no validation {metric} at the selected epoch {epoch}; the learning-rate search "
                     "needs a validation split (--val-fraction > 0)")


def search_finished(directory: Path) -> bool:
    """Whether a search run is over: it finished, or it failed (`FAILED_MARKER`)."""
    return (directory / "final_metrics.json").is_file() or (directory / FAILED_MARKER).is_file()


def choose_lr(scores: dict[float, float | None]) -> float | None:
    """The rate with the highest validation score (ties: the smaller rate); None if no run finished."""
    finished = [(score, lr) for lr, score in scores.items() if score is not None]
    if not finished:
        return None
    return max(finished, key=lambda item: (item[0], -item[1]))[1]


def searched_losses(losses: list[str]) -> list[str]:
    """The losses the search trains: the base loss of every entry of ``losses``, once each, in order."""
    return list(dict.fromkeys(parse_variant(loss)[0] for loss in losses))


def _train_once(name: str, prefix: str, directory: Path, argv: list[str], done: dict[str, list[str]]) -> int:
    """Train (or resume, or skip) one run into ``directory`` and record the outcome in ``done``;
    returns dml.train's exit code (0 for a skipped run)."""
    from dml.train import main as train_main

    if (directory / "final_metrics.json").is_file():
        print(f"{prefix} {name}: finished before, skipped", flush=True)
        done["skipped"].append(name)
        return 0
    if (directory / "last.pt").is_file():
        print(f"{prefix} {name}: interrupted before, resuming", flush=True)
        argv, kind = ["--resume", str(directory)], "resumed"
    else:
        print(f"{prefix} {name}: training", flush=True)
        kind = "trained"
    t0 = time.time()
    code = train_main(argv)
    if code != 0:
        print(f"{prefix} {name}: dml.train exited with {code}", file=sys.stderr, flush=True)
        done["failed"].append(f"{name} (exit {code})")
        if code == 130:  # Ctrl-C: stop here (the same command resumes)
            raise KeyboardInterrupt
        return code
    print(f"{prefix} {name}: done in {time.time() - t0:.0f} s", flush=True)
    done[kind].append(name)
    return 0


def new_outcomes() -> dict[str, list[str]]:
    """An empty record of what an invocation trained, resumed, skipped and failed."""
    return {"trained": [], "resumed": [], "skipped": [], "failed": []}


def run_search(args: argparse.Namespace, extra: list[str], done: dict[str, list[str]]) -> dict[str, Any]:
    """Train every (base loss, learning rate) of the search not finished yet (none with ``--no-train``)
    and choose each loss's rate.

    Returns:
        ``{loss: {"trials": {lr: validation R@1 or None}, "chosen": lr or None}}`` per base loss.
    """
    losses = searched_losses(args.losses)
    runs = [(loss, lr) for loss in losses for lr in args.search_lr]
    for i, (loss, lr) in enumerate([] if args.no_train else runs, 1):
        directory = search_dir(args.output_dir, loss, lr)
        name = f"search {loss}/lr{lr!r}"
        if (directory / FAILED_MARKER).is_file():
            print(f"[search {i}/{len(runs)}] {name}: failed before, not retried (delete {directory} to retry)")
            continue
        code = _train_once(name, f"[search {i}/{len(runs)}]", directory,
                           train_argv(args, loss, args.search_seed, extra, directory=directory, lr=lr), done)
        if code != 0:  # e.g. diverged: a finding of the search, not something to redo on every call
            (directory / FAILED_MARKER).write_text(json.dumps({"exit_code": code}) + "\n")
    search: dict[str, Any] = {}
    for loss in losses:
        directories = {lr: search_dir(args.output_dir, loss, lr) for lr in args.search_lr}
        trials = {lr: validation_score(d) for lr, d in directories.items()}
        complete = all(search_finished(d) for d in directories.values())  # choose among all rates, or not yet
        search[loss] = {"trials": trials, "chosen": choose_lr(trials) if complete else None}
    return search


def run_all(args: argparse.Namespace, extra: list[str], done: dict[str, list[str]],
            search: dict[str, Any] | None = None) -> None:
    """Train every (loss, seed) that has no ``final_metrics.json`` yet, with the searched rate if any;
    record the outcomes (run names ``loss/seedK``, a failed one with its exit code) in ``done``."""
    runs = [(loss, seed) for loss in args.losses for seed in args.seeds]
    for i, (loss, seed) in enumerate(runs, 1):
        lr = None
        if search is not None:
            lr = search[parse_variant(loss)[0]]["chosen"]
            if lr is None:
                print(f"[{i}/{len(runs)}] {loss}/seed{seed}: the search of its loss is not complete, not trained",
                      file=sys.stderr, flush=True)
                done["failed"].append(f"{loss}/seed{seed} (search not complete)")
                continue
        directory = run_dir(args.output_dir, loss, seed)
        trained_lr = _config_lr(directory)
        if lr is not None and trained_lr is not None and trained_lr != lr:
            print(f"[{i}/{len(runs)}] {loss}/seed{seed}: trained before with lr {trained_lr!r}, but the search "
                  f"chose {lr!r}: use another --output-dir", file=sys.stderr, flush=True)
            done["failed"].append(f"{loss}/seed{seed} (lr {trained_lr!r} is not the searched {lr!r})")
            continue
        _train_once(f"{loss}/seed{seed}", f"[{i}/{len(runs)}]", directory,
                    train_argv(args, loss, seed, extra, lr=lr), done)


def _config_lr(directory: Path) -> float | None:
    """The base learning rate a run in ``directory`` was started with (None: no run there yet)."""
    path = directory / "config.json"
    return float(json.loads(path.read_text())["lr"]) if path.is_file() else None


def aggregate(output: Path, losses: list[str], seeds: list[int],
              chosen: dict[str, float | None] | None = None) -> dict[str, Any]:
    """Collect the finished runs' ``final_metrics.json`` into per-loss means and standard deviations.

    Args:
        output: the comparison's output directory.
        losses: the losses, in table order.
        seeds: the seeds.
        chosen: after a search, the rate chosen per base loss: only runs trained with it are counted
            (none of a loss whose search is not complete).

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
            lr = _config_lr(path.parent)
            if chosen is not None and lr != chosen.get(parse_variant(loss)[0]):
                continue  # not trained with the searched rate (run_all reported it)
            final = json.loads(path.read_text())
            row = {key: read_metric(final, key) for key, _ in METRICS}
            row["lr"] = lr
            row.update(uncertainty_details(final))
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
        detail_keys = [f"rejection@{f:g}" for f in REJECTION_POINTS] + [f"spearman_{k}" for k in DEGRADATIONS]
        kappa_keys = {"auroc_kappa", "degradation_spearman", *detail_keys}
        for key in [k for k, _ in METRICS] + detail_keys:
            values = [r[key] for r in runs.values() if r[key] is not None]
            if key in kappa_keys and not concentration:
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


def format_uncertainty(results: dict[str, Any]) -> str:
    """The uncertainty table of the vMF losses: Recall@1 of the queries kept after rejecting the least
    confident fractions, and the Spearman ρ of κ with each corruption's strength (mean ± std over seeds);
    empty if no loss has an uncertainty evaluation."""
    rows = []
    for loss, entry in results["losses"].items():
        metrics = entry["metrics"]
        if metrics.get("rejection@0", {}).get("mean") is None:
            continue
        cells = [_cell(metrics[f"rejection@{f:g}"]) for f in REJECTION_POINTS]
        cells += [_cell(metrics[f"spearman_{k}"]) for k in DEGRADATIONS]
        rows.append(f"| `{loss}` | " + " | ".join(cells) + " |")
    if not rows:
        return ""
    header = ("| `--loss` | " + " | ".join(f"R@1, {f:.0%} rejected" for f in REJECTION_POINTS) + " | "
              + " | ".join(f"ρ(κ, {k})" for k in DEGRADATIONS) + " |")
    return "\n".join([header, "|---|" + "---|" * (len(REJECTION_POINTS) + len(DEGRADATIONS)), *rows])


def format_runs(results: dict[str, Any]) -> str:
    """Per-run details: base learning rate, test R@1 per seed, before training, selected epoch, wall time."""
    lines = ["| `--loss` | seed | lr | test R@1 | before training | selected epoch | R@1 of the last epoch "
             "| wall time |", "|---|---|---|---|---|---|---|---|"]
    for loss, entry in results["losses"].items():
        for seed, run in entry["runs"].items():
            def fmt(v):
                return "—" if v is None else f"{v:.3f}"
            wall = run.get("wall_time_s")
            lr = "—" if run.get("lr") is None else f"{run['lr']:g}"
            lines.append(f"| `{loss}` | {seed} | {lr} | {fmt(run['recall@1'])} | {fmt(run['recall@1_initial'])} | "
                         f"{run['selected_epoch']} | {fmt(run['last_epoch_recall@1'])} | "
                         f"{'—' if wall is None else f'{wall:.0f} s'} |")
    return "\n".join(lines)


def format_search(search: dict[str, Any], seed: int) -> str:
    """The search table: the validation score per loss and learning rate (bold: the chosen rate)."""
    rates = sorted({float(lr) for entry in search.values() for lr in entry["trials"]})
    lines = [f"Learning-rate search (seed {seed}; the validation score — the runs' `--selection-metric`, R@1 by "
             f"default — at the selected epoch; bold: the rate the seeds used; —: failed or not finished):", "",
             "| `--loss` | " + " | ".join(f"lr {lr:g}" for lr in rates) + " |", "|---|" + "---|" * len(rates)]
    for loss, entry in search.items():
        trials = {float(lr): score for lr, score in entry["trials"].items()}
        cells = []
        for lr in rates:
            score = trials.get(lr)
            cell = "—" if score is None else f"{score:.3f}"
            cells.append(f"**{cell}**" if entry["chosen"] is not None and float(entry["chosen"]) == lr else cell)
        lines.append(f"| `{loss}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render(results: dict[str, Any]) -> str:
    """The block written to ``OUTPUT/results.md`` and between the markers of ``docs/results.md``."""
    meta = results["meta"]
    uncertainty = format_uncertainty(results)
    if uncertainty:
        uncertainty = (f"Uncertainty (vMF losses): test Recall@1 of the queries kept after rejecting the given "
                       f"fraction with the lowest κ (accuracy–rejection curve), and the Spearman ρ of κ with the "
                       f"strength of each corruption (negative: κ falls as the image degrades):\n\n"
                       f"{uncertainty}\n\n")
    search = ""
    if results.get("search"):
        search = f"{format_search(results['search'], meta['search_seed'])}\n\n"
    return (
        f"{search}{format_table(results)}\n\n"
        f"Mean ± sample standard deviation over the seeds; test split, validation-selected checkpoint; "
        f"trunk `{meta['trunk']}` on `{meta['device']}`, epochs: {meta['epochs']}; AUROC(κ) and the degradation "
        f"Spearman only where κ = ‖e‖ is a vMF concentration. Generated by `benchmarks/compare_losses.py` "
        f"on {meta['date']}.\n\n"
        f"{uncertainty}"
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
                        help="dml.train --trunk (auto: partial on CPU, fine-tuning on GPU)")
    parser.add_argument("--epochs", type=int, default=0, help="dml.train --epochs (0: its default, 40 frozen / 20 "
                                                              "partial / 30 fine-tuning)")
    parser.add_argument("--dataset", default="emoji", help="dml.train --dataset")
    parser.add_argument("--data-root", default=None, help="dml.train --data-root")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/compare"),
                        help="runs go to OUTPUT/<loss>/seed<k>; results.md and results.json to OUTPUT")
    parser.add_argument("--feature-cache", type=Path, default=None,
                        help="shared cache of frozen-trunk features or partial-trunk activations "
                             "(default OUTPUT/features)")
    parser.add_argument("--write-docs", action="store_true",
                        help="replace the marked section of --docs with the table")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "results.md", help="the page --write-docs edits")
    parser.add_argument("--no-train", action="store_true", help="only aggregate the finished runs")
    parser.add_argument("--search-lr", nargs="+", type=float, default=None, metavar="LR",
                        help="search these base learning rates per loss on the validation split before the seeds")
    parser.add_argument("--search-seed", type=int, default=0, help="the seed of the search runs")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the comparison; returns 0 when every run finished, 1 when some failed, 2 on a usage error."""
    started = time.time()
    parser = build_parser()
    args, extra = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    bad = [a for a in extra if a.split("=")[0] in RESERVED]
    if bad:
        parser.error(f"{', '.join(bad)}: set by this script for every run")
    if args.search_lr:
        searched = [a for a in extra if a.split("=")[0] in SEARCHED]
        if searched:
            parser.error(f"{', '.join(searched)}: chosen per loss by --search-lr")
        if any(not lr > 0 for lr in args.search_lr):
            parser.error(f"--search-lr: every rate must be > 0, got {args.search_lr}")
        args.search_lr = sorted(set(args.search_lr))
    from dml.uncertainty import kappa_is_concentration

    try:
        for loss in args.losses:
            kappa_is_concentration(parse_variant(loss)[0])  # unknown losses and bad variants fail here
    except ValueError as err:
        parser.error(str(err))
    if args.feature_cache is None:
        args.feature_cache = args.output_dir / "features"
    args.output_dir.mkdir(parents=True, exist_ok=True)

    done = new_outcomes()
    search = None
    try:
        if args.search_lr:
            try:
                search = run_search(args, extra, done)
            except ValueError as err:  # a run without validation metrics: the search cannot choose
                print(f"error: {err}", file=sys.stderr)
                return 2
        if not args.no_train:
            run_all(args, extra, done, search)
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to continue where it stopped", file=sys.stderr)
        return 130
    chosen = None if search is None else {loss: entry["chosen"] for loss, entry in search.items()}
    results = aggregate(args.output_dir, list(args.losses), list(args.seeds), chosen)
    if not results["losses"]:
        print("no finished run to tabulate", file=sys.stderr)
        return 1
    if search is not None:
        results["search"] = {loss: {"trials": {repr(lr): v for lr, v in entry["trials"].items()},
                                    "chosen": entry["chosen"]} for loss, entry in search.items()}
    results["meta"] = _meta(args, results, extra, started)
    results["meta"]["search_seed"] = args.search_seed if search is not None else None
    results["meta"]["runs"] = done
    block = render(results)
    print("\n" + block)
    (args.output_dir / "results.md").write_text(
        f"# Loss comparison\n\n`{results['meta']['command']}`\n\n{block}", encoding="utf-8")
    (args.output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.output_dir / 'results.md'} and {args.output_dir / 'results.json'}")
    missing = [f"{loss}/seed{s}" for loss in args.losses for s in args.seeds
               if str(s) not in (results["losses"].get(loss) or {}).get("runs", {})]
    if args.write_docs and not (missing or done["failed"]):
        text = args.docs.read_text(encoding="utf-8")
        args.docs.write_text(replace_between_markers(text, block), encoding="utf-8")
        print(f"updated the table in {args.docs}")
    elif args.write_docs:
        print(f"{args.docs} not updated: the comparison is not complete", file=sys.stderr)
    if missing:
        print(f"not finished: {', '.join(missing)}", file=sys.stderr)
    if done["failed"]:
        print(f"failed: {', '.join(done['failed'])}", file=sys.stderr)
    return 1 if missing or done["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
