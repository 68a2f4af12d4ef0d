"""The training loop: epochs of optimizer steps, validation, checkpoints, and exact restore.

The `Trainer` gets its parts ready-made (`dml.build.build_run`, or hand-made in the tests with a tiny
in-memory model) and owns only the loop and its state: the position in the run, the running loss of
the epoch, the best validation score, the history, and the two checkpoints ``last.pt`` (everything to
resume exactly) and ``best.pt`` (the validation-selected weights). It never builds anything, never
reads the configuration file, and never evaluates on the test split by itself.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dml.build import RunParts
from dml.checkpoint import atomic_write_text, rng_state, save_checkpoint, seed_everything, set_rng_state
from dml.distributed import DistContext, ModelAndLoss, wrap
from dml.metrics import evaluate_embeddings
from dml.runtime import Interrupted, TrainingDiverged, deferred_stop, distribution_validation


class Trainer:
    """One training run's loop and state. Under DDP every process builds one and they step together.

    Args:
        parts: the run's model, loss, pipeline, sampler, optimizer, scheduler and resolved config.
        out_dir: the run directory (``last.pt``, ``best.pt``, ``history.jsonl`` are written there).
        dist: the `dml.distributed.DistContext` (default: a single process, no process group).
        quiet: print nothing (no log lines, no progress bar). Ranks other than 0 are always quiet.
        checkpoint_extra: saved with every ``last.pt`` under its own keys (e.g. the data fingerprint).

    Attributes:
        parts: as given.
        config: the resolved `dml.config.TrainConfig` (``parts.config``).
        epoch: completed epochs.
        step_in_epoch: completed steps of the current epoch.
        running: ``{"total", "count"}``, the loss sum of the epoch so far (kept for resuming mid-epoch).
        best: ``{"metric": best validation score, "epoch": its epoch}``.
        history: one record per completed epoch (what ``history.jsonl`` holds).
    """

    def __init__(self, parts: RunParts, out_dir: str | Path, *, dist: DistContext | None = None, quiet: bool = False,
                 checkpoint_extra: dict[str, Any] | None = None):
        self.parts, self.config = parts, parts.config
        self.model, self.loss, self.pipeline = parts.model, parts.loss, parts.pipeline
        self.sampler, self.optimizer, self.scheduler = parts.sampler, parts.optimizer, parts.scheduler
        self.device = parts.device
        self.out = Path(out_dir)
        self.dist = dist or DistContext()
        self.quiet = quiet or not self.dist.is_main
        self.checkpoint_extra = dict(checkpoint_extra or {})
        self.steps_per_epoch = len(self.sampler)
        self.epoch, self.step_in_epoch = 0, 0
        self.running: dict[str, Any] = {"total": 0.0, "count": 0}
        self.best: dict[str, Any] = {"metric": -math.inf, "epoch": 0}
        self.history: list[dict[str, Any]] = []
        self._stop_requested: Callable[[], int] = lambda: 0
        self.train_module = ModelAndLoss(self.model, self.loss, self.pipeline)
        self.step_module: torch.nn.Module = self.train_module
        if self.dist.enabled:
            bn_trains = self.config.trunk == "finetune" and not self.config.freeze_batchnorm
            self.step_module = wrap(self.train_module, self.device,
                                    broadcast_buffers=bn_trains and self.device.type != "cuda")
            if self.dist.rank > 0:
                # the Monte-Carlo losses draw from the global RNG: other processes must not repeat rank 0's noise
                seed_everything(self.config.seed * 1_000_003 + self.dist.rank)

    def log(self, message: str) -> None:
        """Print a line (flushed) unless the trainer is quiet.

        Args:
            message: the line.
        """
        if not self.quiet:
            print(message, flush=True)

    # --- state --------------------------------------------------------------------------------------
    def state(self, rng_per_rank: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Everything needed to resume exactly (what ``last.pt`` holds).

        Args:
            rng_per_rank: under DDP, the RNG states of all processes in rank order (stored as
                ``rng_per_rank``; `save_last` gathers them).

        Returns:
            The config (as a dict), state dicts of model, loss, optimizer and scheduler, the RNG states
            (`dml.checkpoint.rng_state`), the position (``epoch``, ``step_in_epoch``, the running loss
            of the epoch: under DDP the sums over all processes), the best validation score, the history
            and ``checkpoint_extra``.
        """
        state = {
            **self.checkpoint_extra,
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "loss": self.loss.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "running": self.running,
            "best": self.best,
            "history": self.history,
        }
        if rng_per_rank is not None:
            state["rng_per_rank"] = rng_per_rank
            state["world_size"] = len(rng_per_rank)
        return state

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a `state` (of ``last.pt``): weights, optimizer, schedule, RNGs, position, history.

        Args:
            state: what `state` returned (possibly saved by another number of processes: the run then
                continues, but not bit for bit as it would have).
        """
        self.model.load_state_dict(state["model"])
        self.loss.load_state_dict(state["loss"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.running = state.get("running", {"total": 0.0, "count": 0})
        self.best, self.history = state["best"], state["history"]
        per_rank = state.get("rng_per_rank")
        if self.dist.world_size > 1 and per_rank is not None and len(per_rank) == self.dist.world_size:
            set_rng_state(per_rank[self.dist.rank])
        else:
            if self.dist.world_size > 1 or per_rank is not None:
                self.log(f"warning: {state.get('world_size', 1)} process(es) wrote {self.out / 'last.pt'}, "
                         f"{self.dist.world_size} resume it: the run continues, but not exactly as it would have")
            set_rng_state(state["rng"])
        if not self.dist.is_main:
            # rank 0 continues the epoch's running loss (a sum over all processes) alone
            self.running = {"total": 0.0, "count": 0}

    def save_last(self) -> None:
        """Write `state` to ``OUTPUT/last.pt`` atomically (under DDP: collective; rank 0 writes, then all wait)."""
        if not self.dist.enabled:
            save_checkpoint(self.out / "last.pt", self.state())
            return
        rngs = self.dist.all_gather_object(rng_state())
        if self.dist.is_main:
            save_checkpoint(self.out / "last.pt", self.state(rngs))
        self.dist.barrier()  # nobody leaves (and exits) while rank 0 is still writing

    def _save_best(self) -> None:
        if self.dist.is_main:
            save_checkpoint(self.out / "best.pt", {"model": self.model.state_dict(), "loss": self.loss.state_dict(),
                                                   "epoch": self.epoch, "config": self.config.to_dict()})

    # --- evaluation during training -------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, split_name: str, *, with_nmi: bool = True) -> dict[str, float]:
        """Retrieval (and clustering) metrics of the current model on ``val`` or ``test``.

        Under DDP every process must call it: the embeddings are gathered, rank 0 computes the metrics
        and every process returns them.

        Args:
            split_name: ``"val"`` or ``"test"``.
            with_nmi: also compute the NMI (k-means; the most expensive part).

        Returns:
            The dict of `dml.metrics.evaluate_embeddings` (Python floats).
        """
        embeddings, labels = self.pipeline.embed_split(split_name)  # under DDP: gathered on every process
        return self.dist.on_main(lambda: evaluate_embeddings(embeddings, labels, seed=self.config.seed,
                                                             with_nmi=with_nmi))

    # --- the loop -------------------------------------------------------------------------------------
    def fit(self, has_val: bool) -> None:
        """Train the remaining epochs (from the restored position), validating and checkpointing each.

        A SIGINT or SIGTERM here only records the request; training stops at the next step boundary
        (or after the epoch's checkpoint) with ``last.pt`` saved there, so the checkpoint never holds
        half a step. A second signal interrupts at once without saving (``last.pt`` then holds the
        previous boundary).

        Args:
            has_val: whether there are validation classes (otherwise the last epoch is selected).

        Raises:
            TrainingDiverged: if a parameter or an epoch's mean loss becomes non-finite.
            Interrupted: after a stop signal, with ``last.pt`` saved.
        """
        with deferred_stop() as requested, distribution_validation(False):  # validation checks are host syncs
            if self.dist.enabled:
                # one process may get the signal a step later than another: stop where any of them has it
                self._stop_requested = lambda: self._agreed_signal(requested())
            else:
                self._stop_requested = requested
            try:
                while self.epoch < self.config.epochs:
                    self._one_epoch(has_val)
            finally:
                self._stop_requested = lambda: 0

    def _agreed_signal(self, signum: int) -> int:
        """Under DDP: the stop request of any process (one all-reduce), as a signal number (0: none)."""
        return (signum or signal.SIGINT) if self.dist.any(bool(signum)) else 0

    def _stop(self, signum: int) -> Interrupted:
        return self.dist.mark_shared(Interrupted(signum))  # type: ignore[return-value]

    def _one_epoch(self, has_val: bool) -> None:
        config = self.config
        t0 = time.time()
        stats = self.train_epoch()
        record: dict[str, Any] = {"epoch": self.epoch + 1, "train": stats, "seconds": round(time.time() - t0, 2)}
        if has_val:
            val = self.evaluate("val", with_nmi=config.selection_metric == "nmi")
            record["val"] = val
            score = val[config.selection_metric]
        else:
            score = float(self.epoch)  # no validation classes: the last epoch is selected
        self.epoch += 1
        self.step_in_epoch = 0
        if score > self.best["metric"]:
            self.best = {"metric": score, "epoch": self.epoch}
            self._save_best()
        self.history.append(record)
        if self.dist.is_main:
            atomic_write_text(self.out / "history.jsonl", "".join(json.dumps(r) + "\n" for r in self.history))
        self.save_last()  # under DDP: collective, ends at a barrier after rank 0 wrote it
        val_text = f"val {config.selection_metric} {score:.4f}" if has_val else "no validation split"
        self.log(f"epoch {self.epoch}/{config.epochs}: loss {stats['loss']:.4f}  {val_text}  "
                 f"(best epoch {self.best['epoch']})  {record['seconds']:.1f} s")
        signum = self._stop_requested()
        if signum:
            raise self._stop(signum)  # last.pt was just saved at this epoch boundary

    def train_epoch(self) -> dict[str, float]:
        """One epoch (resuming mid-epoch if the restored state says so); returns the mean loss and stats.

        Returns:
            ``{"loss": mean loss of the epoch}`` plus, where the loss reports them, ``temperature``,
            ``mean_image_kappa``, ``mean_proxy_kappa`` and ``accuracy`` of its last batch.

        Raises:
            TrainingDiverged: if a parameter or the mean loss becomes non-finite.
            Interrupted: after a stop signal, with ``last.pt`` saved at the step boundary.
        """
        self.model.train()
        self.loss.train()
        self.sampler.set_epoch(self.epoch)
        batches = self.epoch_batches()
        start = self.step_in_epoch
        # the running loss: a sum over steps (under DDP, over processes too: rank 0 carries the saved part)
        total = torch.as_tensor(self.running["total"], dtype=torch.float64, device=self.device)
        count = self.running["count"]
        progress = self._progress(len(batches), start)
        stream = self.pipeline.train_batches(batches, self.epoch, start)
        for step in range(start, len(batches)):
            signum = self._stop_requested()  # under DDP: decided together, so every process stops at this step
            if signum:
                self.step_in_epoch = step
                self.running = self._reduce_running(total, count)
                self.save_last()
                if progress is not None:
                    progress.close()
                raise self._stop(signum)
            try:
                inputs, labels = next(stream)
                value = self.train_step(inputs, labels)
            except (RuntimeError, ValueError) as err:
                # NaN weights surface as errors deeper down (e.g. the vMF sampler never accepting): name the cause
                if not all(torch.isfinite(p).all() for p in self._parameters()):
                    raise TrainingDiverged(f"training diverged in epoch {self.epoch + 1}, step {step + 1} "
                                           f"(non-finite parameters); lower --lr (now {self.config.lr:g}) or the "
                                           "loss's learning-rate multipliers") from err
                raise
            self.step_in_epoch = step + 1
            total += value.detach()
            count += 1
            if progress is not None:
                progress.update(1)
                if (step + 1) % self.config.log_every == 0:
                    progress.set_postfix(loss=f"{float(total) / count:.4f}")  # one host sync per log_every steps
        if progress is not None:
            progress.close()
        running = self._reduce_running(total, count)
        self.running = {"total": 0.0, "count": 0}
        mean = running["total"] / running["count"] if running["count"] else float("nan")
        if not math.isfinite(mean):
            # every process saw the same (all-reduced) mean
            raise self.dist.mark_shared(TrainingDiverged(
                f"training diverged in epoch {self.epoch + 1} (mean loss {mean}); lower --lr (now "
                f"{self.config.lr:g}) or the loss's learning-rate multipliers"))
        return {"loss": mean, **self._loss_stats()}

    def _loss_stats(self) -> dict[str, float]:
        loss_stats = getattr(self.loss, "stats", None)
        if loss_stats is None:
            return {}
        values = {}
        for name in ("temperature", "mean_image_kappa", "mean_proxy_kappa", "accuracy"):
            value = getattr(loss_stats, name, None)
            if value is not None:
                values[name] = value
        if self.dist.enabled and values:  # the last batch's stats, averaged over the processes' parts
            merged = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=self.device).reshape(())
                                  for v in values.values()])
            merged = self.dist.all_reduce_sum(merged) / self.dist.world_size
            values = dict(zip(values, merged.unbind()))
        return {name: float(value) for name, value in values.items()}

    def epoch_batches(self) -> list[list[int]]:
        """The batches of the epoch set on the sampler, as `dml.pipeline.Pipeline.train_batches` takes them.

        Returns:
            One process: the sampler's batches. Under DDP: the *global* batches
            (`dml.data.ClassBalancedBatchSampler.global_batches`); each process's pipeline keeps its part.
        """
        if self.dist.world_size > 1:
            return self.sampler.global_batches()
        return list(self.sampler)

    def train_step(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One optimizer step on one (local) batch: forward, backward, gradient clipping, step, schedule.

        Under DDP the gradients of the model *and* the loss are averaged over the processes during the
        backward pass (one DDP over `dml.distributed.ModelAndLoss`); every process then takes the same step.

        Args:
            inputs: images or cached features from `dml.pipeline.Pipeline.train_batches`.
            labels: their ``[B]`` labels.

        Returns:
            The (local) loss of the batch, detached (no host synchronisation).
        """
        value = self.step_module(inputs, labels)
        self.optimizer.zero_grad(set_to_none=True)
        value.backward()
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return value.detach()

    def _reduce_running(self, total: torch.Tensor, count: int) -> dict[str, Any]:
        """The epoch's running loss as ``{"total", "count"}`` summed over the processes (collective under DDP)."""
        if not self.dist.enabled:
            return {"total": float(total), "count": count}
        both = torch.stack([total.to(torch.float64).reshape(()),
                            torch.tensor(float(count), dtype=torch.float64, device=total.device)])
        reduced = self.dist.all_reduce_sum(both).tolist()
        return {"total": reduced[0], "count": int(round(reduced[1]))}

    def _progress(self, total: int, start: int) -> Any:
        """A progress bar on stderr when it is a terminal (a redirected log gets the epoch lines only)."""
        if self.quiet or not sys.stderr.isatty():
            return None
        try:
            from tqdm import tqdm
        except ImportError:
            return None
        return tqdm(total=total, initial=start, desc=f"epoch {self.epoch + 1}/{self.config.epochs}", leave=False,
                    file=sys.stderr, dynamic_ncols=True)

    def _parameters(self) -> Any:
        yield from self.model.parameters()
        yield from self.loss.parameters()
