"""``python -m dml.train``: train an image-retrieval embedding with a proxy-based loss, select it on
validation classes, and report it on test classes never seen in training.

The default run (no flags) trains the probabilistic EL-nivMF loss on the offline emoji benchmark with an
ImageNet EfficientNet-Lite0. On a CPU it freezes the trunk and trains the embedding head on cached
trunk features (it says so); on a GPU it fine-tunes the whole network.

Run directory (``--output-dir``): ``config.json`` (the effective configuration), ``history.jsonl`` (one
line per epoch), ``last.pt`` (everything needed to resume), ``best.pt`` (the validation-selected
weights), ``initial_metrics.json`` and ``final_metrics.json`` (test metrics of the selected checkpoint,
of the last epoch, and before training), and ``NOTICE.txt`` (data attribution).

Several GPUs: ``torchrun --standalone --nproc_per_node=N -m dml.train …`` trains with DDP (``--batch-size``
is then the global batch, split over the processes); see `dml.distributed` for the command lines (also
multi-node) and what changes.
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from dml.checkpoint import (
    atomic_write_json,
    atomic_write_text,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from dml.config import ConfigError, TrainConfig, config_from_dict, parse_config
from dml.data import ClassBalancedBatchSampler, DatasetError, Splits, load_splits
from dml.distributed import DistContext, ModelAndLoss, env_rank, init_from_env, wrap
from dml.evaluation import evaluate_embeddings
from dml.report import write_report
from dml.uncertainty import evaluate_uncertainty, kappa_is_concentration
from dml.losses import build_loss
from dml.models import EmbeddingModel, ModelError, build_model
from dml.pipeline import DeviceImagePipeline, FeaturePipeline, ImagePipeline, Pipeline

USAGE_ERRORS = (ConfigError, DatasetError, ModelError)


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite (one-line message with the epoch and a remedy)."""


SELECTION_METRICS = ("recall@1", "recall@2", "recall@4", "recall@8", "map@r", "r_precision", "nmi",
                     "recall@1_euclidean", "recall@2_euclidean", "recall@4_euclidean", "recall@8_euclidean",
                     "map@r_euclidean", "r_precision_euclidean")


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA if available, else CPU; otherwise the named device (checked).

    Args:
        name: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Returns:
        The `torch.device`.

    Raises:
        ConfigError: if ``name`` is not a device, names CUDA on a machine without it, or another device
            type (only CPU and CUDA are supported).
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name}: only cpu and cuda are supported")
    return device


def check_config(config: TrainConfig) -> None:
    """Reject impossible settings before any data is touched.

    Checks positive integers (``embed_dim``, ``batch_size``, ``samples_per_class``, ``eval_batch_size``,
    ``log_every``, ``feature_views``), ``batch_size`` a multiple of ``samples_per_class``, finite
    non-negative numbers (``lr``, ``weight_decay``, ``grad_clip``, ``init_norm``, ``warmup_epochs``,
    ``head_lr_mult``), ``val_fraction`` in [0, 1), the choices of ``optimizer``, ``scheduler``,
    ``trunk`` and ``selection_metric``, and ``resolution`` ≥ 0. The loss's options are checked when the
    loss is built.

    Args:
        config: the configuration to check (not modified).

    Raises:
        ConfigError: naming the flag and the constraint.
    """
    positive = ("embed_dim", "batch_size", "samples_per_class", "eval_batch_size", "log_every")
    for name in positive:
        if getattr(config, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(config, name)}")
    if config.degradation_images < 0:
        raise ConfigError(f"--degradation-images must be >= 0 (0: automatic), got {config.degradation_images}")
    if config.feature_views < 1:
        raise ConfigError(f"--feature-views must be a positive integer, got {config.feature_views}")
    if config.batch_size % config.samples_per_class:
        raise ConfigError(f"--batch-size {config.batch_size} must be a multiple of --samples-per-class "
                          f"{config.samples_per_class}")
    for name in ("lr", "weight_decay", "grad_clip", "init_norm", "warmup_epochs", "head_lr_mult"):
        value = getattr(config, name)
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
    if not 0 <= config.val_fraction < 1:
        raise ConfigError(f"--val-fraction must be in [0, 1), got {config.val_fraction}")
    choices = {"optimizer": ("adamw", "adam"), "scheduler": ("cosine", "constant"), "amp": ("auto", "bf16", "off"),
               "channels_last": ("auto", "on", "off"), "device_augment": ("auto", "on", "off"),
               "trunk": ("auto", "frozen", "finetune"), "selection_metric": SELECTION_METRICS}
    for name, allowed in choices.items():
        if getattr(config, name) not in allowed:
            raise ConfigError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                              f"got {getattr(config, name)!r}")
    if config.resolution < 0:
        raise ConfigError(f"--resolution must be >= 0 (0: the backbone's own), got {config.resolution}")


def resolve_defaults(config: TrainConfig, device: torch.device) -> TrainConfig:
    """Check the config, then fill the device-dependent defaults (trunk mode, epochs, learning rate).

    ``trunk="auto"`` becomes ``finetune`` on CUDA and ``frozen`` elsewhere; ``epochs`` ≤ 0 becomes 40
    (frozen) or 30 (fine-tuning); ``lr`` ≤ 0 becomes 1e-4.

    Args:
        config: the configuration, modified in place.
        device: the device the run uses.

    Returns:
        The same ``config`` object.

    Raises:
        ConfigError: as `check_config`.
    """
    check_config(config)
    if config.trunk == "auto":
        config.trunk = "finetune" if device.type == "cuda" else "frozen"
    if config.epochs <= 0:
        config.epochs = 40 if config.trunk == "frozen" else 30
    if config.lr <= 0:
        config.lr = 1e-4
    return config


def build_optimizer(config: TrainConfig, model: EmbeddingModel, loss: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW/Adam over the network's groups (with weight decay) and the loss's groups (without).

    Args:
        config: supplies ``optimizer``, ``lr``, ``head_lr_mult`` and ``weight_decay``.
        model: the embedding model (`EmbeddingModel.parameter_groups`).
        loss: the loss module (`dml.losses.ProxyLoss.param_groups`: proxies, concentrations,
            temperature with their own learning-rate multipliers).

    Returns:
        The optimizer; every group keeps its ``name``.

    Raises:
        ConfigError: if ``config.optimizer`` is neither ``adamw`` nor ``adam``.
    """
    groups = model.parameter_groups(config.lr, head_lr_mult=config.head_lr_mult)
    for g in groups:
        g["weight_decay"] = config.weight_decay
    for g in loss.param_groups(config.lr):
        groups.append({**g, "weight_decay": 0.0})
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr)
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.lr)
    raise ConfigError(f"--optimizer must be adamw or adam, got {config.optimizer!r}")


def build_scheduler(
    config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    r"""Per-step schedule: linear warm-up, then cosine decay to zero (or constant).

    With $N$ = ``epochs × steps_per_epoch`` steps and $W$ = ``round(warmup_epochs × steps_per_epoch)``
    (at most $N - 1$) warm-up steps, the learning rates of all groups are multiplied at step $s$ by

    $$
    \lambda(s) = rac{s + 1}{W} \ (s < W), \qquad
    \lambda(s) = 	frac12\Big(1 + \cosig(\pi \min(1, 	frac{s - W}{\max(1, N - W)})ig)\Big) \ (s \ge W),
    $$

    or $\lambda(s) = 1$ after the warm-up for ``scheduler="constant"``. Call ``step()`` after every
    optimizer step.

    Args:
        config: supplies ``epochs``, ``warmup_epochs`` and ``scheduler``.
        optimizer: the optimizer whose learning rates are scheduled.
        steps_per_epoch: optimizer steps per epoch.

    Returns:
        A `torch.optim.lr_scheduler.LambdaLR`.

    Raises:
        ConfigError: if ``config.scheduler`` is neither ``cosine`` nor ``constant``.

    References:
        I. Loshchilov, F. Hutter, "SGDR: Stochastic Gradient Descent with Warm Restarts", ICLR 2017
        (cosine decay).
    """
    total = max(1, config.epochs * steps_per_epoch)
    warmup = min(total - 1, int(round(config.warmup_epochs * steps_per_epoch)))
    if config.scheduler not in ("cosine", "constant"):
        raise ConfigError(f"--scheduler must be cosine or constant, got {config.scheduler!r}")

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if config.scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Trainer:
    """One training run: set-up, the epoch loop, checkpoints, evaluation. See the module docstring.

    The constructor does the whole set-up: device and defaults (`resolve_defaults`), seeding, the
    splits (`dml.data.load_splits`), model and loss, the pipeline (frozen-trunk features are computed
    here), the class-balanced sampler, the head calibration of a new run
    (`dml.models.EmbeddingModel.calibrate_head` to ``init_norm`` or the loss's default), optimizer and
    scheduler, and restores ``resume_state`` if given. `fit` then trains and evaluates.

    Under DDP (``dist`` with a process group, see `dml.distributed`) each process builds the same
    trainer on ``cuda:LOCAL_RANK`` (or the CPU), trains one DDP instance over model and loss
    (`dml.distributed.ModelAndLoss`) on its part of every global batch, and only rank 0 prints and
    writes files; the set-up's errors are agreed on by all processes before the first collective.

    Args:
        config: the run's configuration (its device-dependent defaults are filled in place).
        resume_state: the state of an interrupted run (`load_resume`), or None for a new run.
        quiet: print nothing (no log lines, no progress bar). Ranks other than 0 are always quiet.
        dist: the `dml.distributed.DistContext` (default: a single process, no process group).

    Attributes:
        config: the effective `TrainConfig`.
        device: the `torch.device` of the run.
        splits: the train / val / test `dml.data.Splits`.
        model: the `dml.models.EmbeddingModel`.
        loss: the `dml.losses.ProxyLoss`.
        pipeline: the `dml.pipeline.Pipeline` producing batches and evaluation embeddings.
        dist: the `dml.distributed.DistContext`.
        step_module: what a training step calls: `dml.distributed.ModelAndLoss` (model and loss), in DDP
            under a process group.
        epoch: completed epochs.
        best: ``{"metric": best validation score, "epoch": its epoch}``.
        history: one record per completed epoch (what ``history.jsonl`` holds).

    Raises:
        ConfigError: bad settings (including an unknown loss or loss option).
        DatasetError: the dataset cannot be loaded, or its val / test split has no class with two images.
        ModelError: unknown backbone or unusable weights.
    """

    def __init__(self, config: TrainConfig, *, resume_state: dict[str, Any] | None = None, quiet: bool = False,
                 dist: DistContext | None = None):
        self.started = time.time()  # wall time of this invocation, feature caching included
        self.config = config
        self.dist = dist or DistContext()
        self.quiet = quiet or not self.dist.is_main
        self.out = Path(config.output_dir)
        if not self.dist.enabled:
            self._setup(resume_state)
        else:
            # every process sets itself up on its own; a failure anywhere stops all of them here, before
            # the first collective of the training (where the others would wait for it forever)
            error = None
            try:
                self._setup(resume_state)
            except Exception as err:  # noqa: BLE001 - re-raised by agree, on every process
                error = err
            self.dist.agree(error)
        self.train_module = ModelAndLoss(self.model, self.loss, self.pipeline)
        self.step_module: torch.nn.Module = self.train_module
        if self.dist.enabled:
            bn_trains = config.trunk == "finetune" and not config.freeze_batchnorm
            self.step_module = wrap(self.train_module, self.device,
                                    broadcast_buffers=bn_trains and self.device.type != "cuda")

    def _setup(self, resume_state: dict[str, Any] | None) -> None:
        """Everything each process does on its own: data, model, loss, pipeline, optimizer, restore."""
        config, dist = self.config, self.dist
        try:
            self.device = dist.device_for(resolve_device(config.device))
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if self.device.type == "cuda" and dist.enabled:
            torch.cuda.set_device(self.device)
        resolve_defaults(config, self.device)
        if dist.world_size > 1 and config.batch_size % dist.world_size:
            raise ConfigError(f"--batch-size {config.batch_size} is the global batch and must be a multiple of the "
                              f"number of processes ({dist.world_size})")
        seed_everything(config.seed)
        self.splits: Splits = load_splits(config.dataset, config.data_root, val_fraction=config.val_fraction,
                                          split_seed=config.split_seed)
        for name in ("val", "test"):
            split = getattr(self.splits, name)
            if len(split) and max(Counter(split.labels).values()) < 2:
                raise DatasetError(f"the {name} split of {config.dataset} ({config.data_root}) has no class with two "
                                   "or more images: nothing can be retrieved")
        self.model = build_model(config.backbone, config.embed_dim, weights=config.weights, pooling=config.pooling,
                                 freeze_batchnorm=config.freeze_batchnorm,
                                 freeze_trunk=config.trunk == "frozen").to(self.device)
        if dist.enabled and config.trunk == "finetune" and not config.freeze_batchnorm:
            if self.device.type == "cuda":
                torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)  # batch statistics over all processes
                self.log("BatchNorm: SyncBatchNorm (statistics over the global batch)")
            else:
                self.log("BatchNorm: per-process batch statistics (SyncBatchNorm needs CUDA); the running "
                         "statistics of rank 0 are broadcast before every step")
        try:
            self.loss = build_loss(config.loss, num_classes=self.splits.train.num_classes,
                                   embed_dim=config.embed_dim, **config.loss_options).to(self.device)
        except ValueError as err:  # unknown loss or option: a usage error, reported in one line
            raise ConfigError(str(err)) from None
        resolution = config.resolution or self.model.spec.resolution
        cuda = self.device.type == "cuda"
        amp = config.amp == "bf16" or (config.amp == "auto" and cuda)
        channels_last = config.channels_last == "on" or (config.channels_last == "auto" and cuda)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        if config.compile:
            self.model.trunk.forward = torch.compile(self.model.trunk.forward)  # state-dict keys unchanged
        if config.trunk == "frozen":
            pipeline_type = FeaturePipeline
        elif config.device_augment == "on" or (config.device_augment == "auto" and
                                               DeviceImagePipeline.fits(self.splits, resolution, self.device)):
            pipeline_type = DeviceImagePipeline
        else:
            pipeline_type = ImagePipeline
        s = self.splits
        self.log(f"data: {s.name}: {s.train.num_classes} train / {s.val.num_classes} val / {s.test.num_classes} test "
                 f"classes ({len(s.train)} / {len(s.val)} / {len(s.test)} images)")
        self.log(pipeline_type.describe(self.model, config, resolution, self.device))
        if dist.world_size > 1:
            part = config.batch_size // dist.world_size
            split_groups = "" if part % config.samples_per_class == 0 else (
                f"; --samples-per-class {config.samples_per_class} groups are split between processes")
            self.log(f"DDP: {dist.world_size} processes, global batch {config.batch_size} = {dist.world_size} x "
                     f"{part}{split_groups}")
        self.pipeline: Pipeline = pipeline_type(self.model, self.splits, config, resolution, self.device, log=self.log,
                                                dist=dist)
        self.pipeline.autocast_dtype = torch.bfloat16 if amp else None
        self.pipeline.channels_last = channels_last
        self.sampler = ClassBalancedBatchSampler(self.splits.train.labels, config.batch_size, config.samples_per_class,
                                                 seed=config.seed, num_replicas=dist.world_size, rank=dist.rank)
        self.steps_per_epoch = len(self.sampler)
        if resume_state is None:
            target = config.init_norm or self.loss.initial_norm_per_dim * config.embed_dim
            if target > 0:
                self.model.calibrate_head(self.pipeline.calibration_features(), target)
        self.optimizer = build_optimizer(config, self.model, self.loss)
        self.scheduler = build_scheduler(config, self.optimizer, self.steps_per_epoch)
        self.epoch, self.step_in_epoch = 0, 0
        self.running: dict[str, Any] = {"total": 0.0, "count": 0}  # loss sum of the epoch so far (resume)
        self._interrupted = lambda: False
        self.best: dict[str, Any] = {"metric": -math.inf, "epoch": 0}
        self.history: list[dict[str, Any]] = []
        if resume_state is not None:
            self._restore(resume_state)
        elif dist.rank > 0:
            # the Monte-Carlo losses draw from the global RNG: other processes must not repeat rank 0's noise
            seed_everything(config.seed * 1_000_003 + dist.rank)

    # ---------------------------------------------------------------------------------------------
    def log(self, message: str) -> None:
        """Print a line (flushed) unless the trainer is quiet.

        Args:
            message: the line.
        """
        if not self.quiet:
            print(message, flush=True)

    def state(self, rng_per_rank: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Everything needed to resume exactly (what ``last.pt`` holds).

        Args:
            rng_per_rank: under DDP, the RNG states of all processes in rank order (stored as
                ``rng_per_rank``; `save_last` gathers them).

        Returns:
            The config (as a dict), state dicts of model, loss, optimizer and scheduler, the RNG states
            (`dml.checkpoint.rng_state`; ``rng_per_rank`` too under DDP), the position (``epoch``,
            ``step_in_epoch``, the running loss of the epoch: under DDP the sums over all processes),
            the best validation score and the history.
        """
        state = {
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

    def _restore(self, state: dict[str, Any]) -> None:
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

    # ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, split_name: str, *, with_nmi: bool = True) -> dict[str, float]:
        """Retrieval (and clustering) metrics of the current model on ``val`` or ``test``.

        Under DDP every process must call it: the embeddings are gathered (`dml.pipeline.Pipeline.embed_split`),
        rank 0 computes the metrics and every process returns them.

        Args:
            split_name: ``"val"`` or ``"test"``.
            with_nmi: also compute the NMI (k-means; the most expensive part).

        Returns:
            The dict of `dml.evaluation.evaluate_embeddings` (Python floats).

        Raises:
            ValueError: if the split has no class with two or more images.
        """
        embeddings, labels = self.pipeline.embed_split(split_name)  # under DDP: gathered on every process
        return self.dist.on_main(lambda: evaluate_embeddings(embeddings, labels, seed=self.config.seed,
                                                             with_nmi=with_nmi))

    def train_epoch(self) -> dict[str, float]:
        """One epoch (resuming mid-epoch if a checkpoint says so); returns the mean loss and stats.

        Returns:
            ``{"loss": mean loss of the epoch}`` plus, where the loss reports them, ``temperature``,
            ``mean_image_kappa``, ``mean_proxy_kappa`` and ``accuracy`` of its last batch.

        Raises:
            TrainingDiverged: if a parameter or the mean loss becomes non-finite.
            KeyboardInterrupt: after a deferred Ctrl-C, with ``last.pt`` saved at the step boundary.
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
            if self._interrupted():  # under DDP: decided together, so every process stops at this step
                self.step_in_epoch = step
                self.running = self._reduce_running(total, count)
                self.save_last()
                raise _stopped_together()
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
            err = TrainingDiverged(f"training diverged in epoch {self.epoch + 1} (mean loss {mean}); lower --lr "
                                   f"(now {self.config.lr:g}) or the loss's learning-rate multipliers")
            err.dist_shared = True  # every process saw the same (all-reduced) mean
            raise err
        stats = {"loss": mean}
        loss_stats = getattr(self.loss, "stats", None)
        if loss_stats is not None:
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
            for name, value in values.items():
                stats[name] = float(value)
        return stats

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
        both = self.dist.all_reduce_sum(both).tolist()
        return {"total": both[0], "count": int(round(both[1]))}

    def _progress(self, total: int, start: int):
        if self.quiet:
            return None
        try:
            from tqdm import tqdm
        except ImportError:
            return None
        return tqdm(total=total, initial=start, desc=f"epoch {self.epoch + 1}/{self.config.epochs}", leave=False,
                    file=sys.stdout, dynamic_ncols=True)

    def _parameters(self):
        yield from self.model.parameters()
        yield from self.loss.parameters()

    def _epochs(self, has_val: bool) -> None:
        """The remaining epochs: train, validate, keep the best checkpoint, save ``last.pt``.

        A Ctrl-C (SIGINT) here only sets a flag; training stops at the next step boundary or after the
        epoch's checkpoint, with ``last.pt`` saved there, so the checkpoint never holds half a step. A
        second Ctrl-C interrupts at once without saving (``last.pt`` then holds the previous boundary).
        """
        with _deferred_sigint() as interrupted:
            if self.dist.enabled:
                # one process may get the signal a step later than another: stop where any of them has it
                self._interrupted = lambda: self.dist.any(interrupted())
            else:
                self._interrupted = interrupted
            try:
                self._epoch_loop(has_val)
            finally:
                self._interrupted = lambda: False

    def _epoch_loop(self, has_val: bool) -> None:
        config = self.config
        while self.epoch < config.epochs:
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
                if self.dist.is_main:
                    save_checkpoint(self.out / "best.pt", {"model": self.model.state_dict(),
                                                           "loss": self.loss.state_dict(),
                                                           "epoch": self.epoch, "config": config.to_dict()})
            self.history.append(record)
            if self.dist.is_main:
                atomic_write_text(self.out / "history.jsonl", "".join(json.dumps(r) + "\n" for r in self.history))
            self.save_last()  # under DDP: collective, ends at a barrier after rank 0 wrote it
            val_text = f"val {config.selection_metric} {score:.4f}" if has_val else "no validation split"
            self.log(f"epoch {self.epoch}/{config.epochs}: loss {stats['loss']:.4f}  {val_text}  "
                     f"(best epoch {self.best['epoch']})  {record['seconds']:.1f} s")
            if self._interrupted():
                raise _stopped_together()  # last.pt was just saved at this epoch boundary

    def fit(self) -> dict[str, Any]:
        """Train (from the start or from the resumed state), then evaluate and write ``final_metrics.json``.

        A new run first writes ``config.json``, ``NOTICE.txt`` and the test metrics before training.
        After the epochs, the test metrics of the last epoch and of the validation-selected checkpoint
        (``best.pt``; the last epoch when there are no validation classes) are computed.

        Under DDP every process calls it; rank 0 alone reads and writes the run directory (the others get
        what it reads over the process group) and all return after ``final_metrics.json`` is written.

        Returns:
            The test metrics of the selected checkpoint plus ``recall@1_initial``, ``selected_epoch``,
            ``selection``, ``last_epoch`` (metrics), ``initial`` (metrics), ``trunk``, ``device`` and
            ``wall_time_s`` (and ``world_size`` under DDP): what ``final_metrics.json`` holds.

        Raises:
            TrainingDiverged: if training diverges.
            KeyboardInterrupt: on Ctrl-C (``last.pt`` then allows ``--resume``).
        """
        config = self.config
        main = self.dist.is_main  # under DDP only rank 0 touches the run directory; the others get what it reads
        initial_path = self.out / "initial_metrics.json"

        def new_run() -> bool:
            self.out.mkdir(parents=True, exist_ok=True)
            return not initial_path.exists()

        if self.dist.on_main(new_run):
            if main:
                atomic_write_json(self.out / "config.json", config.to_dict())
                if self.splits.notice:
                    atomic_write_text(self.out / "NOTICE.txt", self.splits.notice + "\n")
            initial = self.evaluate("test")
            if main:
                atomic_write_json(initial_path, initial)
            self.log(f"test before training: R@1 {initial['recall@1']:.4f}  MAP@R {initial['map@r']:.4f}")
            self.save_last()
        initial = self.dist.on_main(lambda: json.loads(initial_path.read_text()))
        has_val = len(self.splits.val) > 0
        with _validation(False):  # torch.distributions' argument checks are host syncs in every step
            self._epochs(has_val)
        last = self.evaluate("test")
        best_model = self.dist.on_main(lambda: load_checkpoint(self.out / "best.pt")["model"])
        self.model.load_state_dict(best_model)
        embeddings, labels = self.pipeline.embed_split("test")  # once: retrieval and uncertainty share them
        selected = self.dist.on_main(lambda: evaluate_embeddings(embeddings, labels, seed=config.seed))
        resolution = config.resolution or self.model.spec.resolution
        uncertainty = details = None
        if main and kappa_is_concentration(config.loss):
            # κ = ‖e‖ as the image's certainty (vMF losses only); the degradation test re-runs the network
            uncertainty, details = evaluate_uncertainty(
                self.model, self.splits.test, embeddings, labels, resolution=resolution, device=self.device,
                batch_size=min(config.eval_batch_size, 64), seed=config.seed,
                degradation_images=config.degradation_images or (256 if self.device.type == "cuda" else 64))
        final = {
            **selected,
            "recall@1_initial": initial["recall@1"],
            "selected_epoch": self.best["epoch"],
            "selection": f"best validation {config.selection_metric}" if has_val else "last epoch (no validation split)",
            "last_epoch": last,
            "initial": initial,
            "trunk": config.trunk,
            "device": str(self.device),
            "wall_time_s": round(time.time() - self.started, 1),  # this invocation (a resumed run: since resuming)
            "uncertainty": uncertainty,
        }
        if self.dist.world_size > 1:
            final["world_size"] = self.dist.world_size
        if main:
            atomic_write_json(self.out / "final_metrics.json", final)
            write_report(self.out, history=self.history, final_metrics=final, uncertainty=uncertainty,
                         test_split=self.splits.test, per_query=details, resolution=resolution,
                         config=config.to_dict())
        self.log(f"test (epoch {self.best['epoch']}, selected on validation): R@1 {selected['recall@1']:.4f} "
                 f"(before training {initial['recall@1']:.4f})  R@4 {selected['recall@4']:.4f}  "
                 f"MAP@R {selected['map@r']:.4f}  NMI {selected['nmi']:.4f}")
        if uncertainty is not None:
            degradation = uncertainty.get("degradation") or {}
            auroc = uncertainty.get("auroc_kappa")
            self.log(f"uncertainty: AUROC(κ → 1-NN correct) {auroc if auroc is None else round(auroc, 4)}  "
                     f"Spearman(κ, strength) {degradation.get('mean_spearman')}")
        self.log(f"wrote {self.out / 'final_metrics.json'} and {self.out / 'report.md'}")
        self.dist.barrier()  # every process returns once the files exist
        return final


def _stopped_together() -> KeyboardInterrupt:
    """The KeyboardInterrupt of a stop that every process decided together (`DistContext.any`)."""
    err = KeyboardInterrupt()
    err.dist_shared = True  # type: ignore[attr-defined]
    return err


@contextlib.contextmanager
def _validation(enabled: bool):
    """Set torch.distributions' default argument validation within the block."""
    previous = torch.distributions.Distribution._validate_args
    torch.distributions.Distribution.set_default_validate_args(enabled)
    try:
        yield
    finally:
        torch.distributions.Distribution.set_default_validate_args(previous)


@contextlib.contextmanager
def _deferred_sigint():
    """Within the block, the first SIGINT sets a flag (read with the yielded callable) instead of raising;
    a second one raises `KeyboardInterrupt` at once. Outside the main thread nothing changes."""
    import signal
    import threading

    flag = {"set": False}
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return

    def handler(signum, frame):
        if flag["set"]:
            raise KeyboardInterrupt
        flag["set"] = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: flag["set"]
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def run_lock(directory: str | Path):
    """Hold an exclusive lock on ``DIRECTORY/.lock`` so two processes never train into one run directory.

    A context manager (``with run_lock(directory): ...``); the directory is created if needed. Without
    ``fcntl`` (Windows) there is no lock.

    Args:
        directory: the run directory.

    Yields:
        None, while the lock is held.

    Raises:
        ConfigError: if another process holds it.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as handle:
        try:
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # no fcntl (Windows): no lock
            pass
        except OSError:
            raise ConfigError(f"{directory} is in use by another training process") from None
        yield


def load_resume(directory: str | Path) -> tuple[TrainConfig, dict[str, Any]]:
    """The config and state of an interrupted run (its ``last.pt``).

    Args:
        directory: the run directory.

    Returns:
        ``(config, state)``: the saved `TrainConfig` with ``output_dir`` set to ``directory``, and the
        state for ``Trainer(config, resume_state=state)``.

    Raises:
        ConfigError: if ``directory/last.pt`` does not exist, or the saved config is invalid.
    """
    directory = Path(directory)
    path = directory / "last.pt"
    if not path.is_file():
        raise ConfigError(f"--resume {directory}: no checkpoint last.pt there")
    state = load_checkpoint(path)
    config = config_from_dict(state["config"])
    config.output_dir = str(directory)
    return config, state


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m dml.train``; returns the process exit code.

    Usage errors and divergence are printed as one line on stderr (no traceback). Started by torchrun
    (``RANK``/``WORLD_SIZE`` in the environment) it joins the process group first (`dml.distributed`):
    rank 0 then checks the output directory, takes the run lock, reads ``last.pt`` for ``--resume`` and
    prints; the other processes get the configuration and state from it. An error that every process
    shares is printed once (by rank 0); an error of one process alone is printed by it with its rank.

    Args:
        argv: the command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        0 on success, 2 on a usage error (`ConfigError`, `DatasetError`, `ModelError`), 1 if training
        diverged, 130 if interrupted (Ctrl-C).

    Raises:
        SystemExit: from `argparse` for ``--help`` or an unknown flag.
    """
    config = None
    dist = DistContext()
    rank = env_rank()
    clean = False
    trainer = None

    def report(err: BaseException, line: str) -> None:
        # one line per failure: rank 0 prints shared errors, another rank only what happened to it alone
        if rank == 0:
            print(line, file=sys.stderr)
        elif dist.enabled and not getattr(err, "dist_shared", False):
            print(f"[rank {rank}] {line.lstrip()}", file=sys.stderr)

    try:
        config = parse_config(argv)
        try:
            dist = init_from_env()
        except ValueError as err:
            raise ConfigError(str(err)) from None
        rank = dist.rank
        with contextlib.ExitStack() as stack:
            requested = config

            def prepare() -> tuple[TrainConfig, dict[str, Any] | None]:
                # rank 0 only: the run directory and its lock live on rank 0's machine
                cfg, state = requested, None
                if cfg.resume:
                    cfg, state = load_resume(cfg.resume)
                elif (Path(cfg.output_dir) / "last.pt").exists():
                    raise ConfigError(f"{cfg.output_dir} already holds a run: pass --resume {cfg.output_dir} to "
                                      "continue it, or choose another --output-dir")
                stack.enter_context(run_lock(cfg.output_dir))
                return cfg, state

            config, state = dist.on_main(prepare)
            trainer = Trainer(config, resume_state=state, dist=dist)
            trainer.fit()
        clean = True
    except USAGE_ERRORS as err:
        report(err, f"error: {err}")
        clean = getattr(err, "dist_shared", False)  # every process stops here: leave the group normally
        return 2
    except TrainingDiverged as err:
        report(err, f"error: {err}")
        clean = getattr(err, "dist_shared", False)
        return 1
    except KeyboardInterrupt as err:
        if rank == 0:
            if config is not None and (Path(config.output_dir) / "last.pt").exists():
                resume = f"python -m dml.train --resume {config.output_dir}"
                if dist.world_size > 1:
                    resume = f"torchrun … -m dml.train --resume {config.output_dir}"
                print(f"\ninterrupted: resume with  {resume}", file=sys.stderr)
            else:
                print("\ninterrupted before the first checkpoint: run the same command again", file=sys.stderr)
        clean = getattr(err, "dist_shared", False) or dist.world_size == 1
        return 130
    finally:
        trainer = None  # its DDP module holds the process group: release it before leaving the group
        propagating = sys.exc_info()[1]
        if propagating is not None:  # an uncaught error's traceback would keep the trainer's frames alive
            traceback.clear_frames(propagating.__traceback__)
        dist.close(clean)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
