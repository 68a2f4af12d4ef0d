"""``python -m dml.evaluate --run DIR``: re-evaluate a trained run with the same evaluation as its training.

Reads ``DIR/config.json``, rebuilds the model with the weights of ``DIR/best.pt`` (or ``last.pt``),
embeds the test split exactly as the run's training did (`dml.pipeline.evaluation_embeddings`) and runs
the one final evaluation (`dml.final_eval.evaluate_final`) with the run's own settings — so on the same
machine it reproduces the numbers of ``final_metrics.json`` (runs whose images were cropped on the GPU,
``--device-augment``, come close but not bit for bit: here they are decoded and cropped on the CPU).
Every option means what it means in ``dml.train``: ``--degradation-images`` defaults to the run's value
and 0 skips the degradation test; ``--batch-size`` is the run's ``--eval-batch-size``. The result is
added to ``DIR/final_metrics.json`` under ``"evaluate"`` (the rest of the file is kept; written
atomically) and shown as one more row of ``DIR/report.md`` (``--no-report``: the report is left alone).

Example::

    python -m dml.evaluate --run runs/demo
    python -m dml.evaluate --run runs/demo --checkpoint last --device cpu
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dml.build import load_data, make_model, precision
from dml.checkpoint import atomic_write_json, load_checkpoint
from dml.config import ConfigError, OneLineParser, TrainConfig, config_from_dict, saved_run_config
from dml.final_eval import EvaluateResult, evaluate_final, wants_uncertainty
from dml.models import EmbeddingModel, ModelError, to_channels_last
from dml.pipeline import evaluation_embeddings
from dml.report import ReportInputs, metric_rows, write_report
from dml.runtime import (
    EXPECTED_ERRORS,
    RunFailure,
    configure_allocator,
    exit_status,
    install_stop_signals,
    one_line,
    resolve_device,
    run_lock,
)


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m dml.evaluate`` argument parser.

    Returns:
        An argument parser with ``--run``, ``--checkpoint``, ``--device``, ``--batch-size``,
        ``--degradation-images``, ``--uncertainty`` and ``--no-report``.
    """
    parser = OneLineParser(
        prog="python -m dml.evaluate",
        description="Re-evaluate a dml.train run with the evaluation of its training: test retrieval metrics, "
        "uncertainty of the embedding norm, and a row in DIR/report.md. Results go into DIR/final_metrics.json "
        "under 'evaluate'.",
    )
    parser.add_argument("--run", required=True, metavar="DIR", help="the run directory (holds config.json and best.pt)")
    parser.add_argument("--checkpoint", choices=("best", "last"), default="best",
                        help="which weights: best.pt (validation-selected) or last.pt (default: best)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    parser.add_argument("--batch-size", type=int, default=None, metavar="N",
                        help="images embedded at once, as dml.train's --eval-batch-size (default: the run's)")
    parser.add_argument("--degradation-images", type=int, default=None, metavar="N",
                        help="test images in the degradation test, as in dml.train (0: skip it; default: the run's)")
    parser.add_argument("--uncertainty", choices=("auto", "on", "off"), default="auto",
                        help="uncertainty evaluation: auto (vMF-based losses only), on, off (default: auto)")
    parser.add_argument("--no-report", dest="report", action="store_false", help="leave report.md alone")
    return parser


def load_run(run_dir: str | Path, checkpoint: str = "best") -> tuple[TrainConfig, dict[str, Any]]:
    """The configuration and the checkpoint of a run directory.

    Args:
        run_dir: the directory ``dml.train`` wrote.
        checkpoint: ``"best"`` or ``"last"``.

    Returns:
        ``(config, state)``: the run's `TrainConfig` (``output_dir`` set to ``run_dir``) and the loaded
        checkpoint dict (its ``"model"`` is the model's state dict).

    Raises:
        ConfigError: if the directory, ``config.json`` or the checkpoint is missing.
        RunFailure: if ``config.json`` or the checkpoint cannot be read.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise ConfigError(f"--run {run}: no such run directory")
    config_path = run / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"--run {run}: no config.json there (not a dml.train run directory)")
    try:
        values = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RunFailure(f"cannot parse {config_path}: {err}") from None
    if not isinstance(values, dict):
        raise RunFailure(f"{config_path} does not hold a configuration")
    config = saved_run_config({**values, "output_dir": str(run)})
    path = run / f"{checkpoint}.pt"
    if not path.is_file():
        raise ConfigError(f"--run {run}: no checkpoint {path.name} there (training has not finished an epoch?)")
    try:
        state = load_checkpoint(path)
    except Exception as err:  # noqa: BLE001 - a corrupt file becomes one line
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise RunFailure(f"cannot load checkpoint {path} (truncated or not a dml checkpoint: {first})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise RunFailure(f"checkpoint {path} holds no model weights")
    return config, state


def rebuild_model(config: TrainConfig, model_state: dict[str, torch.Tensor]) -> EmbeddingModel:
    """The run's `dml.models.EmbeddingModel` with the checkpoint's weights (on the CPU, eval mode).

    The architecture is rebuilt without loading backbone weights (the checkpoint holds all of them).

    Args:
        config: the run's configuration (backbone, embedding dimension, pooling, BatchNorm / trunk mode).
        model_state: the model's state dict from the checkpoint.

    Returns:
        The model in eval mode.

    Raises:
        ModelError: if the weights do not fit the configured model.
    """
    model = make_model(config, weights="none")
    try:
        model.load_state_dict(model_state)
    except RuntimeError as err:
        first = str(err).splitlines()[0] if str(err) else "mismatch"
        raise ModelError(f"the checkpoint does not fit a {config.backbone} model with embed_dim {config.embed_dim}: "
                         f"{first}") from None
    return model.eval()


def read_history(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``run_dir/history.jsonl`` ([] when the file is missing).

    Args:
        run_dir: the run directory.

    Returns:
        One dict per epoch.

    Raises:
        RunFailure: if a line is not JSON.
    """
    path = Path(run_dir) / "history.jsonl"
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise RunFailure(f"{path}, line {number}: not JSON") from None
    return records


def evaluate_run(run_dir: str | Path, *, checkpoint: str = "best", device: str = "auto", batch_size: int | None = None,
                 degradation_images: int | None = None, uncertainty: str = "auto", report: bool = True,
                 log: Callable[[str], None] = print) -> EvaluateResult:
    """Evaluate a run directory as its training did; add the result to ``final_metrics.json`` and the report.

    Args:
        run_dir: the run directory.
        checkpoint: ``"best"`` or ``"last"``.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        batch_size: images embedded at once (None: the run's ``eval_batch_size``).
        degradation_images: test images in the degradation test (None: the run's; 0: skip it).
        uncertainty: ``"auto"`` (vMF-based losses only), ``"on"`` or ``"off"``.
        report: add the result to ``report.md``.
        log: receives progress lines.

    Returns:
        The `dml.final_eval.EvaluateResult` (its JSON is stored under ``"evaluate"``).

    Raises:
        ConfigError: missing run files, a bad device or option.
        RunFailure: unreadable run files.
        DatasetError: the dataset cannot be loaded.
        ModelError: the checkpoint does not fit the configured model.
    """
    started = time.time()
    for name, value in (("--batch-size", batch_size), ("--degradation-images", degradation_images)):
        if value is not None and value < (1 if name == "--batch-size" else 0):
            raise ConfigError(f"{name} must be {'a positive integer' if name == '--batch-size' else '>= 0'}, "
                              f"got {value}")
    run = Path(run_dir)
    config, state = load_run(run, checkpoint)
    overrides = {k: v for k, v in (("eval_batch_size", batch_size), ("degradation_images", degradation_images))
                 if v is not None}
    config = config_from_dict({**config.to_dict(), **overrides})
    with_uncertainty = wants_uncertainty(config.loss, uncertainty)
    dev = resolve_device(device)
    with run_lock(run):
        model = rebuild_model(config, state["model"]).to(dev)
        splits = load_data(config)
        resolution = config.resolution or model.spec.resolution
        autocast_dtype, channels_last = precision(config, dev)
        if channels_last:
            to_channels_last(model)
        log(f"evaluating {run / (checkpoint + '.pt')} (epoch {state.get('epoch', '?')}) on {len(splits.test)} test "
            f"images of {splits.test.num_classes} classes at {resolution} px on {dev}")
        embeddings, labels = evaluation_embeddings(
            model, splits.test, frozen=config.trunk == "frozen", resolution=resolution, device=dev,
            batch_size=config.eval_batch_size, autocast_dtype=autocast_dtype, channels_last=channels_last,
            partial=config.trunk == "partial")
        final = evaluate_final(model, splits.test, embeddings, labels, config=config, device=dev,
                               resolution=resolution, uncertainty=with_uncertainty)
        result = EvaluateResult(final=final, checkpoint=checkpoint, epoch=state.get("epoch"), device=str(dev),
                                resolution=resolution, wall_time_s=round(time.time() - started, 1))
        final_path = run / "final_metrics.json"
        stored: dict[str, Any] = {}
        if final_path.is_file():
            try:
                stored = json.loads(final_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                raise RunFailure(f"cannot parse {final_path}: fix or remove it") from None
        stored["evaluate"] = result.to_json()
        atomic_write_json(final_path, stored)
        log(f"test {final.metrics.summary()}")
        if final.uncertainty is not None:
            log(final.uncertainty.summary())
        elif uncertainty == "auto":
            log(f"uncertainty: skipped (loss {config.loss} does not model the embedding norm as a concentration; "
                "--uncertainty on forces it)")
        log(f"wrote {final_path} (under \"evaluate\")")
        if report:
            history = read_history(run)
            path = write_report(run, ReportInputs(
                rows=metric_rows(stored, history), history=history, selected_epoch=stored.get("selected_epoch"),
                uncertainty=final.uncertainty, details=final.details, test_split=splits.test, resolution=resolution,
                config=config.to_dict(), device=stored.get("device"), wall_time_s=stored.get("wall_time_s")))
            log(f"wrote {path}")
    return result


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m dml.evaluate``; returns the process exit status.

    Args:
        argv: the command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        0 on success; failures are one line on stderr: 2 for a usage error (a missing run directory or
        file, a bad option, an unloadable dataset), 1 for a runtime failure (an unreadable checkpoint, a
        file that cannot be written), 130 / 143 on SIGINT / SIGTERM.

    Raises:
        SystemExit: from argparse for ``--help`` (0) or a bad flag (2, one line).
    """
    configure_allocator()
    install_stop_signals()
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        evaluate_run(args.run, checkpoint=args.checkpoint, device=args.device, batch_size=args.batch_size,
                     degradation_images=args.degradation_images, uncertainty=args.uncertainty, report=args.report)
    except EXPECTED_ERRORS as err:
        with contextlib.suppress(Exception):
            print("\ninterrupted" if isinstance(err, KeyboardInterrupt) else one_line(err), file=sys.stderr)
        return exit_status(err)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
