"""``python -m dml.evaluate --run DIR``: re-evaluate a trained run — retrieval metrics, the uncertainty of
κ = ‖e‖, and the report.

Reads ``DIR/config.json``, rebuilds the model, loads the weights of ``DIR/best.pt`` (or ``last.pt``),
embeds the test split at the run's resolution, and computes `dml.evaluation.evaluate_embeddings` and,
for the vMF-based losses (`dml.uncertainty.kappa_is_concentration`; ``--uncertainty on`` forces it),
`dml.uncertainty.evaluate_uncertainty`. The results are merged into ``DIR/final_metrics.json`` under
``"evaluate"`` (the rest of the file is kept; written atomically), and ``DIR/report.md`` with its
figures in ``DIR/report/`` is rewritten (`dml.report.write_report`).

Example::

    python -m dml.evaluate --run runs/demo
    python -m dml.evaluate --run runs/demo --checkpoint last --device cpu --degradation-images 64
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from dml.checkpoint import atomic_write_json, load_checkpoint
from dml.config import ConfigError, TrainConfig, config_from_dict
from dml.data import DatasetError, EvalTransform, ImageDataset, Split, eval_resize, load_splits
from dml.evaluation import evaluate_embeddings
from dml.models import EmbeddingModel, ModelError, build_model
from dml.report import write_report
from dml.uncertainty import evaluate_uncertainty, kappa_is_concentration

USAGE_ERRORS = (ConfigError, DatasetError, ModelError)


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m dml.evaluate`` argument parser.

    Returns:
        An `argparse.ArgumentParser` with ``--run``, ``--checkpoint``, ``--device``, ``--batch-size``,
        ``--degradation-images``, ``--uncertainty`` and ``--no-report``.
    """
    parser = argparse.ArgumentParser(
        prog="python -m dml.evaluate",
        description="Re-evaluate a dml.train run: test retrieval metrics, uncertainty of the embedding norm, "
        "and OUTPUT/report.md with plots. Results go into DIR/final_metrics.json under 'evaluate'.",
    )
    parser.add_argument("--run", required=True, metavar="DIR", help="the run directory (holds config.json and best.pt)")
    parser.add_argument("--checkpoint", choices=("best", "last"), default="best",
                        help="which weights: best.pt (validation-selected) or last.pt (default: best)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    parser.add_argument("--batch-size", type=int, default=0,
                        help="images embedded at once (default: the run's eval_batch_size)")
    parser.add_argument("--degradation-images", type=int, default=128,
                        help="test images used by the degradation test (0: skip it; default 128)")
    parser.add_argument("--uncertainty", choices=("auto", "on", "off"), default="auto",
                        help="uncertainty evaluation: auto (vMF-based losses only), on, off (default: auto)")
    parser.add_argument("--no-report", dest="report", action="store_false", help="do not rewrite report.md")
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
        ConfigError: if the directory, ``config.json`` or the checkpoint is missing or unreadable.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise ConfigError(f"--run {run}: no such run directory")
    config_path = run / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"--run {run}: no config.json there (not a dml.train run directory)")
    try:
        config = config_from_dict(json.loads(config_path.read_text(encoding="utf-8")))
    except json.JSONDecodeError as err:
        raise ConfigError(f"cannot parse {config_path}: {err}") from None
    config.output_dir = str(run)
    path = run / f"{checkpoint}.pt"
    if not path.is_file():
        raise ConfigError(f"--run {run}: no checkpoint {path.name} there (training has not finished an epoch?)")
    try:
        state = load_checkpoint(path)
    except Exception as err:  # noqa: BLE001 - a corrupt file becomes one line
        raise ConfigError(f"cannot load checkpoint {path}: {str(err).splitlines()[0] if str(err) else err!r}") from None
    if not isinstance(state, dict) or "model" not in state:
        raise ConfigError(f"checkpoint {path} holds no model weights")
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
        ModelError: if the backbone is unknown or the weights do not fit it.
    """
    model = build_model(config.backbone, config.embed_dim, weights=None, pooling=config.pooling,
                        freeze_batchnorm=config.freeze_batchnorm, freeze_trunk=config.trunk == "frozen")
    try:
        model.load_state_dict(model_state)
    except RuntimeError as err:
        first = str(err).splitlines()[0] if str(err) else "mismatch"
        raise ModelError(f"the checkpoint does not fit a {config.backbone} model with embed_dim {config.embed_dim}: "
                         f"{first}") from None
    return model.eval()


@torch.no_grad()
def embed_split(model: EmbeddingModel, split: Split, resolution: int, device: torch.device,
                batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings of every image of a split, as the trainer's evaluation computes them.

    Images are decoded downscaled to ``round(resolution·256/224)`` on the shorter side and centre-cropped
    by `dml.data.EvalTransform`; the model runs in eval mode.

    Args:
        model: the embedding model, on ``device``.
        split: the split to embed.
        resolution: the crop size in pixels.
        device: where the model is.
        batch_size: images embedded at once.

    Returns:
        ``(embeddings [N, D] float32, labels [N] int64)`` on ``device``.

    Raises:
        DatasetError: if an image cannot be decoded.
    """
    model.eval()
    dataset = ImageDataset(split, EvalTransform(resolution), max_side=eval_resize(resolution), cache=False)
    chunks = []
    for start in range(0, len(dataset), batch_size):
        images = torch.stack([dataset[i][0] for i in range(start, min(start + batch_size, len(dataset)))])
        chunks.append(model(images.to(device)).float())
    labels = torch.as_tensor(split.labels, dtype=torch.long, device=device)
    if not chunks:
        return torch.zeros(0, model.embed_dim, device=device), labels
    return torch.cat(chunks), labels


def read_history(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``run_dir/history.jsonl`` ([] when the file is missing).

    Args:
        run_dir: the run directory.

    Returns:
        One dict per epoch.

    Raises:
        ConfigError: if a line is not JSON.
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
                raise ConfigError(f"{path}, line {number}: not JSON") from None
    return records


def evaluate_run(run_dir: str | Path, *, checkpoint: str = "best", device: str = "auto", batch_size: int = 0,
                 degradation_images: int = 128, uncertainty: str = "auto", report: bool = True,
                 log=print) -> dict[str, Any]:
    """Evaluate a run directory; merge the results into ``final_metrics.json`` and rewrite the report.

    Args:
        run_dir: the run directory.
        checkpoint: ``"best"`` or ``"last"``.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        batch_size: images embedded at once (0: the run's ``eval_batch_size``).
        degradation_images: test images used by the degradation test (0: skip it).
        uncertainty: ``"auto"`` (vMF-based losses only), ``"on"`` or ``"off"``.
        report: rewrite ``report.md``.
        log: receives progress lines.

    Returns:
        What was stored under ``"evaluate"``: the metrics of `dml.evaluation.evaluate_embeddings`,
        ``checkpoint``, ``epoch`` (of the checkpoint), ``device``, ``resolution``, ``uncertainty``
        (the metrics of `dml.uncertainty.evaluate_uncertainty`, or None) and ``wall_time_s``.

    Raises:
        ConfigError: missing or unreadable run files, a bad device or option.
        DatasetError: the dataset cannot be loaded.
        ModelError: the checkpoint does not fit the configured model.
    """
    from dml.train import resolve_device, run_lock  # not at the top: dml.train may import this module

    started = time.time()
    if uncertainty not in ("auto", "on", "off"):
        raise ConfigError(f"--uncertainty must be auto, on or off, got {uncertainty!r}")
    if batch_size < 0 or degradation_images < 0:
        raise ConfigError("--batch-size and --degradation-images must be >= 0")
    run = Path(run_dir)
    config, state = load_run(run, checkpoint)
    dev = resolve_device(device)
    with run_lock(run):
        model = rebuild_model(config, state["model"]).to(dev)
        splits = load_splits(config.dataset, config.data_root, val_fraction=config.val_fraction,
                             split_seed=config.split_seed)
        resolution = config.resolution or model.spec.resolution
        size = batch_size or config.eval_batch_size
        log(f"evaluating {run / (checkpoint + '.pt')} (epoch {state.get('epoch', '?')}) on {len(splits.test)} test "
            f"images of {splits.test.num_classes} classes at {resolution} px on {dev}")
        embeddings, labels = embed_split(model, splits.test, resolution, dev, size)
        try:
            metrics = evaluate_embeddings(embeddings, labels, seed=config.seed)
        except ValueError as err:  # e.g. no test class with two images
            raise DatasetError(f"test split of {config.dataset}: {err}") from None
        try:
            wanted = uncertainty == "on" or (uncertainty == "auto" and kappa_is_concentration(config.loss))
        except ValueError as err:
            raise ConfigError(str(err)) from None
        unc, details = None, None
        if wanted:
            unc, details = evaluate_uncertainty(model, splits.test, embeddings, labels, resolution=resolution,
                                                device=dev, batch_size=min(size, 64), seed=config.seed,
                                                degradation_images=degradation_images)
        result = {**metrics, "checkpoint": checkpoint, "epoch": state.get("epoch"), "device": str(dev),
                  "resolution": resolution, "uncertainty": unc, "wall_time_s": round(time.time() - started, 1)}
        final_path = run / "final_metrics.json"
        final: dict[str, Any] = {}
        if final_path.is_file():
            try:
                final = json.loads(final_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                raise ConfigError(f"cannot parse {final_path}: fix or remove it") from None
        final["evaluate"] = result
        atomic_write_json(final_path, final)
        log(f"test R@1 {metrics['recall@1']:.4f}  R@4 {metrics['recall@4']:.4f}  MAP@R {metrics['map@r']:.4f}  "
            f"NMI {metrics['nmi']:.4f}")
        if unc is not None:
            deg = unc.get("degradation") or {}
            log(f"uncertainty: AUROC(κ) {_text(unc['auroc_kappa'])}  Spearman(κ, AP@R) "
                f"{_text(unc['spearman_kappa_ap'])}  degradation Spearman {_text(deg.get('mean_spearman'))}")
        else:
            log(f"uncertainty: skipped (loss {config.loss} does not model the embedding norm as a concentration; "
                "--uncertainty on forces it)" if uncertainty == "auto" else "uncertainty: off")
        log(f"wrote {final_path} (under \"evaluate\")")
        if report:
            path = write_report(run, history=read_history(run), final_metrics=final, uncertainty=unc,
                                test_split=splits.test, per_query=details, resolution=resolution,
                                config=config.to_dict())
            log(f"wrote {path}")
    return result


def _text(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m dml.evaluate``; returns the process exit code.

    Args:
        argv: the command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        0 on success, 2 on a usage error (`ConfigError`, `DatasetError`, `ModelError`: a missing run
        directory or file, an unloadable dataset or checkpoint), printed as one line on stderr;
        130 on Ctrl-C.

    Raises:
        SystemExit: from `argparse` for ``--help`` or a bad flag.
    """
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        evaluate_run(args.run, checkpoint=args.checkpoint, device=args.device, batch_size=args.batch_size,
                     degradation_images=args.degradation_images, uncertainty=args.uncertainty, report=args.report)
    except USAGE_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
