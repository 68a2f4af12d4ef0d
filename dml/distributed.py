r"""Data-parallel training over several GPUs (or CPU processes) with PyTorch DDP, launched by ``torchrun``.

``python -m dml.train`` started by ``torchrun`` finds ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in its
environment, joins the process group and trains with `torch.nn.parallel.DistributedDataParallel`.
Started without those variables it is the ordinary single-process trainer (no process group at all).

Command lines
-------------

One machine, 8 GPUs (``--batch-size`` is the **global** batch: 112 = 8 processes × 14 images):

```bash
torchrun --standalone --nproc_per_node=8 -m dml.train \
    --dataset cub200 --data-root /data/CUB_200_2011 --backbone resnet50 --weights /data/resnet50.pth \
    --batch-size 112 --output-dir runs/cub_ddp
```

Two machines with 8 GPUs each: run the same command on both, ``--node_rank=0`` on the first and
``--node_rank=1`` on the second; ``HOST:PORT`` is an address of the first machine that the second can
reach (e.g. ``10.0.0.1:29500``), ``--rdzv_id`` any name shared by both:

```bash
torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 \
    --rdzv_backend=c10d --rdzv_endpoint=HOST:PORT --rdzv_id=cub_ddp \
    -m dml.train --dataset cub200 --data-root /data/CUB_200_2011 --backbone resnet50 \
    --weights /data/resnet50.pth --batch-size 112 --output-dir runs/cub_ddp
```

Resume an interrupted multi-process run with the same launcher and ``--resume`` (the same number of
processes continues exactly):

```bash
torchrun --standalone --nproc_per_node=8 -m dml.train --resume runs/cub_ddp
```

On a machine without GPUs the same commands run CPU processes with the gloo backend (e.g.
``torchrun --standalone --nproc_per_node=2 -m dml.train --device cpu …``; torchrun sets
``OMP_NUM_THREADS=1`` per process unless you set it).

What happens
------------

* **Process group.** ``init_process_group`` from the environment (``env://``): backend
  ``cpu:gloo,cuda:nccl`` where CUDA is available (gradients and embeddings of a CUDA run go over NCCL, the
  small control messages over gloo), plain ``gloo`` otherwise. Each process uses ``cuda:LOCAL_RANK``
  (``--device auto`` / ``cuda``); ``--device cpu`` trains on CPUs with gloo.
* **One DDP over the network and the loss.** `ModelAndLoss` holds the embedding model and the loss
  module (proxies, concentrations, temperature); one DDP instance around it averages every gradient, so
  the loss's parameters are updated exactly like the network's. In frozen-trunk mode the trunk's
  parameters need no gradient and only the head and the loss are synchronised.
* **Batches.** `dml.data.ClassBalancedBatchSampler` builds the same global batch of ``--batch-size``
  images on every process and hands process ``r`` the ``r``-th contiguous part (``--batch-size`` must be
  a multiple of the number of processes; groups of ``--samples-per-class`` stay whole when the part is a
  multiple of it). Every process runs the same number of steps. The random crops of the fine-tuning
  pipeline and the cached views of the frozen one are drawn as in a single process, so a process sees
  exactly the images (and augmentations) that its part of the batch has in a single-process run.
* **Losses.** Each process computes its loss as a mean over its part; DDP averages the gradients. For a
  loss that is a mean of per-image terms (``norm_softmax``, ``proxy_nca``, ``el_vmf``, ``ppk_vmf``,
  ``kl_vmf``, ``l2``, ``cosine``, and the cross-entropy of ``el_nivmf`` / ``el_nivmf_paper``) one step of
  N processes × b images is the same step as one process with N·b images (the CI test checks this to
  float rounding). **ProxyAnchor is not such a mean**: its per-proxy log-sum-exp over the batch's
  positives and negatives only sees the process's own part, so N × b trains ProxyAnchor as the average of
  N ProxyAnchor losses over batches of b, not one loss over N·b (and so does the ProxyAnchor guidance
  term of ``el_nivmf``). The Monte-Carlo losses (``el_nivmf``) draw independent samples per process
  (process ``r > 0`` reseeds its global RNG from ``(seed, r)``), so their noise differs from a
  single-process run.
* **BatchNorm.** Frozen BatchNorm (the default) needs no synchronisation. With ``--no-freeze-batchnorm``
  the trunk's BatchNorm layers become `torch.nn.SyncBatchNorm` on CUDA (statistics over the global
  batch); on CPU (gloo, no SyncBatchNorm) each process normalises with its own part's statistics and the
  running statistics of process 0 are broadcast before every step (DDP's ``broadcast_buffers``).
* **Rank 0 writes.** Only process 0 prints, shows the progress bar, holds the run-directory lock, reads
  ``last.pt`` / ``best.pt`` (and shares them with the others over the process group) and writes every
  file; the output directory therefore only has to exist on the machine of process 0 (the data,
  ``--data-root``, must be readable on every machine: each process loads it). Checkpoints are
  written at barriers, so no process exits while process 0 is still writing one.
* **Resume.** ``last.pt`` holds the random-number states of every process (``rng_per_rank``): resuming
  with the same number of processes continues exactly on every process. With another number of
  processes the run continues, but not exactly (each process gets process 0's state).
* **Evaluation.** Fine-tuning: the evaluation batches of ``--eval-batch-size`` images are dealt to the
  processes round-robin, embedded there and gathered (``all_gather``, padded to equal length), so every
  image is embedded in the same batch as in a single process and the embeddings, hence the metrics, are
  identical to a single-process evaluation. Frozen trunk: every process holds all cached features (each
  computes them once) and embeds them itself. The metrics are computed by process 0 and broadcast.
* **Ctrl-C, errors.** torchrun forwards Ctrl-C (SIGINT) once to every process; whether to stop is
  decided together (an all-reduce of the interrupt flags at every step boundary), so all processes stop
  at the same step, ``last.pt`` is saved there and every process exits with 130. An error that only one
  process hits (it cannot reach the others) makes that process tear down its process group and exit;
  torchrun then stops the others. Errors while setting up (bad data, bad flags) are agreed on before
  training starts, so every process stops with the same one-line error.
"""

from __future__ import annotations

import datetime
import gc
import os
import pickle
from collections.abc import Callable
from typing import Any, TypeVar, cast

import torch

T = TypeVar("T")

#: environment variables that make `init_from_env` join a process group (set by torchrun)
ENV_VARIABLES = ("RANK", "WORLD_SIZE")


def env_rank() -> int:
    """This process's rank from the environment (``RANK``, set by torchrun), 0 without one.

    Returns:
        The rank, readable before any process group exists (e.g. to print only on rank 0).
    """
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


class DistContext:
    """Rank, world size and the few collectives the trainer needs; a no-op for a single process.

    Built by `init_from_env`; ``DistContext()`` is the single process (rank 0 of 1, every method a
    no-op or the identity), so code written against it runs unchanged without a process group.

    Args:
        rank: this process's global rank.
        world_size: the number of processes.
        local_rank: the rank on this machine (selects ``cuda:LOCAL_RANK``).
        initialized: whether a process group was created (True under torchrun).

    Attributes:
        rank, world_size, local_rank, initialized: as given.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, *, initialized: bool = False):
        self.rank, self.world_size, self.local_rank = int(rank), int(world_size), int(local_rank)
        self.initialized = bool(initialized)
        self._shared: list[BaseException] = []  # errors every process raised together (see mark_shared)

    def __repr__(self) -> str:
        return (f"DistContext(rank={self.rank}, world_size={self.world_size}, local_rank={self.local_rank}, "
                f"initialized={self.initialized})")

    @property
    def enabled(self) -> bool:
        """True when a process group exists (collectives communicate)."""
        return self.initialized

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the process that prints and writes files)."""
        return self.rank == 0

    # --- errors -------------------------------------------------------------------------------------
    def mark_shared(self, error: BaseException) -> BaseException:
        """Record that every process raises ``error`` at the same point (so only rank 0 reports it).

        Args:
            error: the exception.

        Returns:
            ``error``, for ``raise dist.mark_shared(err)``.
        """
        self._shared.append(error)
        return error

    def is_shared(self, error: BaseException) -> bool:
        """Whether every process raised ``error`` together (`mark_shared`; always True for one process).

        Args:
            error: the exception.

        Returns:
            True if it was marked (or there is no process group).
        """
        return not self.enabled or any(error is e for e in self._shared)

    # --- devices ------------------------------------------------------------------------------------
    def device_for(self, device: torch.device) -> torch.device:
        """The device this process uses: ``cuda:LOCAL_RANK`` for a CUDA device under DDP, else ``device``.

        Args:
            device: the device the configuration asks for (`dml.runtime.resolve_device`).

        Returns:
            The process's device.

        Raises:
            ValueError: if ``LOCAL_RANK`` has no CUDA device on this machine.
        """
        if not self.enabled or device.type != "cuda":
            return device
        count = torch.cuda.device_count()
        if self.local_rank >= count:
            raise ValueError(f"LOCAL_RANK {self.local_rank} but this machine has {count} CUDA device(s): start at "
                             f"most {count} processes per node (--nproc_per_node)")
        return torch.device("cuda", self.local_rank)

    # --- collectives (identity / no-op for a single process) ----------------------------------------
    def barrier(self) -> None:
        """Wait until every process arrives here (a tiny all-reduce over gloo on CPU)."""
        if self.enabled:
            import torch.distributed as dist

            dist.all_reduce(torch.zeros(1))

    def any(self, flag: bool) -> bool:
        """True on every process if ``flag`` is true on any (collective; the flag itself on one process).

        Args:
            flag: this process's flag.

        Returns:
            The logical OR over all processes.
        """
        if not self.enabled:
            return bool(flag)
        import torch.distributed as dist

        t = torch.tensor([1 if flag else 0], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over all processes (in place; on its own device: NCCL for CUDA, gloo for CPU).

        Args:
            tensor: the local values.

        Returns:
            ``tensor``, now holding the sum over processes.
        """
        if self.enabled:
            import torch.distributed as dist

            dist.all_reduce(tensor)
        return tensor

    def broadcast_object(self, obj: T, src: int = 0) -> T:
        """Rank ``src``'s picklable ``obj`` on every process (over gloo, on the CPU).

        Args:
            obj: the object (ignored on other ranks).
            src: the sending rank.

        Returns:
            Rank ``src``'s object.
        """
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src, device=torch.device("cpu"))
        return cast(T, box[0])

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every process's picklable ``obj``, in rank order (over gloo, on the CPU).

        Args:
            obj: this process's object.

        Returns:
            ``[obj of rank 0, obj of rank 1, …]`` on every process (``[obj]`` for a single process).
        """
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def all_gather_rows(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every process's ``tensor`` (same trailing shape and dtype, any number of rows), in rank order.

        The tensors are padded to the largest row count for ``all_gather`` and cut back afterwards.

        Args:
            tensor: ``[n_r, ...]`` on this process's device.

        Returns:
            ``[tensor of rank 0, tensor of rank 1, …]`` on this process's device.
        """
        if not self.enabled:
            return [tensor]
        import torch.distributed as dist

        rows = [int(n) for n in self.all_gather_object(int(tensor.shape[0]))]
        most = max(rows)
        padded = tensor.new_zeros((most, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        out = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(out, padded.contiguous())
        return [t[:n] for t, n in zip(out, rows)]

    # --- decisions taken together -------------------------------------------------------------------
    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and hand its result (or its exception) to every process.

        Use it for whatever only rank 0 may do (read ``last.pt``, check the output directory, compute
        metrics): the other processes wait, then return the same result or raise the same exception
        (marked with `mark_shared`, so that only rank 0 reports it).

        Args:
            fn: a callable without arguments returning something picklable.

        Returns:
            ``fn()``'s result on every process.

        Raises:
            Exception: whatever ``fn`` raised on rank 0 (a copy on the other ranks).
        """
        if not self.enabled:
            return fn()
        if self.is_main:
            try:
                result = fn()
            except BaseException as err:  # noqa: BLE001 - handed to the others, then re-raised here
                self.broadcast_object(("error", _picklable(err)))
                self.mark_shared(err)
                raise
            self.broadcast_object(("ok", result))
            return result
        received: Any = self.broadcast_object(None)
        status, value = received
        if status == "error":
            raise self.mark_shared(value)
        return value

    def agree(self, error: BaseException | None) -> None:
        """Raise on every process if any process failed (collective; raises ``error`` itself for one process).

        Call it after work that each process does on its own (loading data, building the model) and
        before the first collective of the training, so that a failure on one process cannot leave the
        others waiting for it. The raised exception is this process's own, else the lowest failing rank's.

        Args:
            error: this process's exception, or None.

        Raises:
            BaseException: as described (marked with `mark_shared` under a process group).
        """
        if not self.enabled:
            if error is not None:
                raise error
            return
        errors = self.all_gather_object(None if error is None else _picklable(error))
        if error is None:
            error = next((e for e in errors if e is not None), None)
        if error is not None:
            raise self.mark_shared(error)

    def close(self, clean: bool = True) -> None:
        """Leave the process group (best effort; never raises).

        The caller drops its references to DDP-wrapped modules first: a garbage collection here then
        frees them, so that the process group itself is destroyed now, while the interpreter is alive.
        Left to interpreter shutdown, gloo's worker threads may take the GIL of a finalising interpreter,
        which aborts the process ("terminate called without an active exception"; seen in about 1 of 20
        two-process runs before this collection was added).

        Args:
            clean: True after a run that every process finished (``destroy_process_group``); False after
                an error on this process, when the others may be stuck in a collective: the group is
                aborted where torch can (NCCL), otherwise destroyed.
        """
        if not self.enabled:
            return
        import torch.distributed as dist

        self.initialized = False
        gc.collect()  # DDP modules in reference cycles (trainer ↔ closures) still hold the group
        try:
            if not dist.is_initialized():
                return
            if not clean:
                abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
                if abort is not None and torch.cuda.is_available():
                    try:
                        abort()
                        return
                    except Exception:  # noqa: BLE001 - fall back to destroy
                        pass
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - best effort at shutdown
            pass


def _picklable(err: BaseException) -> BaseException:
    """``err`` if it survives pickling, else a `RuntimeError` with its message."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(err).__name__}: {err}")


def init_from_env(timeout: datetime.timedelta | None = None) -> DistContext:
    """Join the process group described by torchrun's environment, or return the single-process context.

    Without ``RANK`` and ``WORLD_SIZE`` in the environment nothing happens (``DistContext()``). With
    them, ``torch.distributed.init_process_group`` is called with ``init_method="env://"`` (it also needs
    ``MASTER_ADDR`` and ``MASTER_PORT``, which torchrun sets) and the backend ``cpu:gloo,cuda:nccl``
    where CUDA (and NCCL) is available, else ``gloo``.

    Args:
        timeout: the collectives' timeout (None: torch's default).

    Returns:
        The `DistContext` of this process.

    Raises:
        ValueError: if the variables are malformed or the rendezvous variables are missing.
    """
    if not all(name in os.environ for name in ENV_VARIABLES):
        return DistContext()
    import torch.distributed as dist

    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError:
        raise ValueError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them)") from None
    if not 0 <= rank < world:
        raise ValueError(f"RANK {rank} is not in [0, WORLD_SIZE={world})")
    if dist.is_initialized():  # e.g. a caller that set up the group itself
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, initialized=True)
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise ValueError(f"RANK and WORLD_SIZE are set but not {' and '.join(missing)}: start the run with torchrun")
    cuda = torch.cuda.is_available() and dist.is_nccl_available()
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    kwargs: dict[str, Any] = {"backend": backend, "init_method": "env://", "rank": rank, "world_size": world}
    if timeout is not None:
        kwargs["timeout"] = timeout
    dist.init_process_group(**kwargs)
    return DistContext(rank, world, local_rank, initialized=True)


class ModelAndLoss(torch.nn.Module):
    """The embedding model and the loss in one module, so that one DDP instance averages every gradient.

    ``forward(inputs, labels)`` is ``loss(embed(inputs), labels)``, where ``embed`` is looked up at call
    time (the trainer passes its pipeline's ``embed_train``: images through the whole network, or
    cached trunk features through the head).

    Args:
        model: the `dml.models.EmbeddingModel`.
        loss: the `dml.losses.ProxyLoss` (its proxies, concentrations and temperature are parameters).
        embedder: an object with an ``embed_train(inputs)`` method (the `dml.pipeline.Pipeline`).
    """

    def __init__(self, model: torch.nn.Module, loss: torch.nn.Module, embedder: Any):
        super().__init__()
        self.model = model
        self.loss = loss
        self.embedder = embedder  # not a Module: a plain attribute, no parameters

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss of one (local) batch.

        Args:
            inputs: images or cached features, as the pipeline yields them.
            labels: ``[B]`` int64 labels.

        Returns:
            The scalar loss (a mean over the local batch).
        """
        return self.loss(self.embedder.embed_train(inputs), labels)


def wrap(module: torch.nn.Module, device: torch.device, *, broadcast_buffers: bool = False) -> torch.nn.Module:
    """``DistributedDataParallel(module)`` on ``device`` (``device_ids=[device]`` for CUDA).

    Args:
        module: typically a `ModelAndLoss`; every parameter that requires a gradient is used in every
            forward (no ``find_unused_parameters``).
        device: the process's device.
        broadcast_buffers: broadcast rank 0's buffers (BatchNorm statistics) before every forward;
            only needed for BatchNorm that trains without SyncBatchNorm.

    Returns:
        The DDP module.
    """
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device] if device.type == "cuda" else None
    # torch >= 2.13 renames the per-forward buffer broadcast (both sync the buffers once at construction)
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    name = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    sync: dict[str, Any] = {name: broadcast_buffers}
    return DistributedDataParallel(module, device_ids=device_ids, **sync)
