"""One training run, start to finish: check the run directory (or the run to resume), build the parts,
train, evaluate the selected checkpoint once (`dml.final_eval`), and write the results and the report.

The data flows one way: configuration → parts (`dml.build`) → loop (`dml.trainer`) → results
(`dml.final_eval`, `dml.report`). ``python -m dml.train`` (`dml.train`) is the command-line face of
`start` and `train_run`.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dml.build import RunParts, build_run, fit_auto_trunk, load_data
from dml.checkpoint import atomic_write_json, atomic_write_text, load_checkpoint
from dml.config import (
    RESUME_OVERRIDES,
    SAVED_RUN_DEFAULTS,
    ConfigError,
    TrainConfig,
    TrainRequest,
    config_changes,
    saved_run_config,
)
from dml.config import resolve as resolve_config
from dml.data import Splits, data_changes, data_fingerprint
from dml.distributed import DistContext
from dml.final_eval import (
    FinalEvaluation,
    RetrievalMetrics,
    TrainingResult,
    evaluate_final,
    split_metrics,
    wants_uncertainty,
)
from dml.report import ReportInputs, write_report
from dml.runtime import RunFailure, prepare_output_dir, resolve_device, run_lock
from dml.trainer import Trainer


@dataclass
class RunStart:
    """What rank 0 found in the run directory (`start`).

    Attributes:
        config: the configuration (a new run's, or the saved one with the overrides applied).
        state: the state of ``last.pt`` to resume from, or None for a new run.
        notes: lines to print (e.g. that the run is extended).
    """

    config: TrainConfig
    state: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


def read_last(directory: Path) -> dict[str, Any]:
    """The state in ``directory/last.pt``.

    Args:
        directory: a run directory.

    Returns:
        The saved state.

    Raises:
        ConfigError: if there is no ``last.pt``.
        RunFailure: if it cannot be read (truncated, not a checkpoint).
    """
    path = directory / "last.pt"
    if not path.is_file():
        raise ConfigError(f"--resume {directory}: no checkpoint last.pt there")
    try:
        state = load_checkpoint(path)
    except Exception as err:  # noqa: BLE001 - truncated or foreign files fail in many ways; one line for all
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise RunFailure(f"cannot read checkpoint {path} (truncated or not a dml checkpoint: {first}); it cannot "
                         "be resumed — start a new run") from None
    if not isinstance(state, dict) or not {"config", "model", "epoch"} <= set(state):
        raise RunFailure(f"{path} is not a dml.train checkpoint; it cannot be resumed")
    return state


def start(request: TrainRequest, stack: contextlib.ExitStack) -> RunStart:
    """Check the run directory and take its lock (rank 0 only): a new run, or the run to resume.

    A resumed run's ``config.json`` must still hold the configuration it was started with (only the
    ``epochs`` may differ): edits to it are refused, not ignored. ``--epochs N`` extends the run to N
    epochs (N must not be below the epochs already trained) and updates ``config.json``.

    Args:
        request: the parsed command line.
        stack: holds the run lock until the caller's block ends.

    Returns:
        The `RunStart`.

    Raises:
        ConfigError: no run to resume, an edited ``config.json``, an impossible ``--epochs``, an output
            directory that already holds a run or is a file, or a directory in use.
        RunFailure: an unreadable checkpoint.
        OSError: the directory cannot be created or written.
    """
    if request.resume is None:
        assert request.config is not None
        config = request.config
        out = prepare_output_dir(config.output_dir)
        if (out / "last.pt").exists():
            raise ConfigError(f"{out} already holds a run: pass --resume {out} to continue it, or choose another "
                              "--output-dir")
        stack.enter_context(run_lock(out))
        return RunStart(config=config)
    directory = request.resume
    if not directory.is_dir():
        raise ConfigError(f"--resume {directory}: no such run directory")
    stack.enter_context(run_lock(directory))
    state = read_last(directory)
    saved = dict(state["config"], output_dir=str(directory))
    config_path = directory / "config.json"
    if config_path.is_file():
        try:
            on_disk = json.loads(config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{config_path} is not valid JSON ({err}); restore it to resume the run") from None
        changed = config_changes({**SAVED_RUN_DEFAULTS, **saved},
                                 {**SAVED_RUN_DEFAULTS, **on_disk, "output_dir": str(directory)}, ignore=("epochs",))
        if changed:
            raise ConfigError(f"{config_path} was edited since the run started ({'; '.join(changed)}); a run resumes "
                              "with its own configuration: undo the edit, or start a new run with --config")
    notes = []
    overrides = {k: v for k, v in request.overrides.items() if k in RESUME_OVERRIDES}
    if "epochs" in overrides:
        if overrides["epochs"] < state["epoch"]:
            raise ConfigError(f"--epochs {overrides['epochs']}: the run in {directory} has already trained "
                              f"{state['epoch']} epochs")
        if overrides["epochs"] != saved["epochs"]:
            verb = "extending" if overrides["epochs"] > saved["epochs"] else "shortening"
            notes.append(f"{verb} the run from {saved['epochs']} to {overrides['epochs']} epochs (the learning-rate "
                         "schedule is recomputed for the new length)")
    config = saved_run_config({**saved, **overrides})
    return RunStart(config=config, state=state, notes=notes)


def check_same_data(state: dict[str, Any], fingerprint: dict[str, Any], directory: Path) -> None:
    """Refuse to resume on data other than the run's (class names, file list and sizes).

    Args:
        state: the state of ``last.pt`` (runs saved before fingerprints existed pass).
        fingerprint: `dml.data.data_fingerprint` of the data now.
        directory: the run directory, for the message.

    Raises:
        ConfigError: naming what changed.
    """
    saved = state.get("data")
    if saved is None:
        return
    changes = data_changes(saved, fingerprint)
    if changes:
        raise ConfigError(f"--resume {directory}: the data changed since the run started ({'; '.join(changes)}); "
                          "a run resumes only on its own data: restore it, or start a new run")


def _write_new_run_files(out: Path, config: TrainConfig, splits: Splits) -> None:
    atomic_write_json(out / "config.json", config.to_dict())
    if splits.notice:
        atomic_write_text(out / "NOTICE.txt", splits.notice + "\n")


def train_run(begin: RunStart, *, dist: DistContext | None = None, quiet: bool = False) -> TrainingResult | None:
    """Build, train and evaluate one run (every process under DDP; rank 0 writes the files).

    Args:
        begin: what `start` returned (under DDP: rank 0's, shared with every process).
        dist: the `dml.distributed.DistContext` (default: a single process).
        quiet: print nothing.

    Returns:
        The `dml.final_eval.TrainingResult` (None on ranks other than 0).

    Raises:
        ConfigError: bad settings; data that changed under a resumed run.
        DatasetError: the data cannot be loaded or is unusable.
        ModelError: unknown backbone or unusable weights.
        TrainingDiverged: if training diverges.
        Interrupted: on SIGINT / SIGTERM (``last.pt`` then allows ``--resume``).
        OSError: a file cannot be written.
    """
    started = time.time()
    dist = dist or DistContext()
    main = dist.is_main

    def log(message: str) -> None:
        if main and not quiet:
            print(message, flush=True)

    for note in begin.notes:
        log(note)
    state = begin.state
    out = Path(begin.config.output_dir)

    def setup() -> tuple[RunParts, dict[str, Any]]:
        # every process on its own: a failure anywhere stops all of them before the first collective
        try:
            device = dist.device_for(resolve_device(begin.config.device))
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if device.type == "cuda" and dist.enabled:
            import torch

            torch.cuda.set_device(device)
        config = resolve_config(begin.config, device.type)
        splits = load_data(config)
        config = fit_auto_trunk(begin.config, config, splits, device.type, dist.world_size, log)
        fingerprint = data_fingerprint(splits)
        if state is not None:
            check_same_data(state, fingerprint, out)
        return build_run(config, splits, device, dist=dist, calibrate=state is None, log=log), fingerprint

    if dist.enabled:
        error, parts = None, None
        try:
            parts, fingerprint = setup()
        except Exception as err:  # noqa: BLE001 - re-raised by agree, on every process
            error = err
        dist.agree(error)
        assert parts is not None
    else:
        parts, fingerprint = setup()
    config = parts.config
    trainer = Trainer(parts, out, dist=dist, quiet=quiet, checkpoint_extra={"data": fingerprint})
    if state is not None:
        try:
            trainer.restore(state)
        except (RuntimeError, ValueError, KeyError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
            raise RunFailure(f"{out / 'last.pt'} does not fit this run's model or optimizer ({first})") from None
        if main:
            atomic_write_json(out / "config.json", config.to_dict())  # an extension changes the epochs
        initial = dist.on_main(lambda: RetrievalMetrics.from_dict(
            json.loads((out / "initial_metrics.json").read_text())))
    else:
        if main:
            _write_new_run_files(out, config, parts.splits)
        initial_json = trainer.evaluate("test")
        initial = RetrievalMetrics.from_dict(initial_json)
        if main:
            atomic_write_json(out / "initial_metrics.json", initial_json)
        log(f"test before training: R@1 {initial.recall[1]:.4f}  MAP@R {initial.map_at_r:.4f}")
        trainer.save_last()
    has_val = len(parts.splits.val) > 0
    trainer.fit(has_val)
    last_epoch = RetrievalMetrics.from_dict(trainer.evaluate("test"))
    final = _evaluate_selected(parts, trainer, dist)
    result = None
    if main:
        assert final is not None
        result = TrainingResult(
            final=final, initial=initial, last_epoch=last_epoch, selected_epoch=trainer.best["epoch"],
            selection=f"best validation {config.selection_metric}" if has_val else "last epoch (no validation split)",
            trunk=config.trunk, device=str(parts.device), wall_time_s=round(time.time() - started, 1),
            world_size=dist.world_size)
        atomic_write_json(out / "final_metrics.json", result.to_json())
        write_report(out, ReportInputs(
            rows=[(f"selected checkpoint (epoch {result.selected_epoch}; {result.selection})", final.metrics),
                  (f"last epoch ({trainer.epoch})", last_epoch), ("before training", initial)],
            history=trainer.history, selected_epoch=result.selected_epoch, uncertainty=final.uncertainty,
            details=final.details, test_split=parts.splits.test, resolution=parts.resolution,
            config=config.to_dict(), device=result.device, wall_time_s=result.wall_time_s))
        log(f"test (epoch {result.selected_epoch}, selected on validation): {final.metrics.summary()}  "
            f"(R@1 before training {initial.recall[1]:.4f})")
        if final.uncertainty is not None:
            log(final.uncertainty.summary())
        log(f"wrote {out / 'final_metrics.json'} and {out / 'report.md'}")
    dist.barrier()  # every process returns once the files exist
    return result


def _evaluate_selected(parts: RunParts, trainer: Trainer, dist: DistContext) -> FinalEvaluation | None:
    """The final evaluation of ``best.pt`` (collective under DDP; the result on rank 0 only)."""
    out = trainer.out
    best = dist.on_main(lambda: load_checkpoint(out / "best.pt")["model"])
    parts.model.load_state_dict(best)
    embeddings, labels = parts.pipeline.embed_split("test")  # once: retrieval and uncertainty share them
    config = parts.config
    domains = parts.splits.test.domains
    metrics = dist.on_main(lambda: split_metrics(embeddings, labels, seed=config.seed, domains=domains))
    if not dist.is_main:
        return None
    return evaluate_final(parts.model, parts.splits.test, embeddings, labels, config=config, device=parts.device,
                          resolution=parts.resolution, uncertainty=wants_uncertainty(config.loss), metrics=metrics)
