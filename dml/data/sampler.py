"""Class-balanced batches: each batch is made of groups of ``m`` images of one class."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch


def _check_int(name: str, value: int, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


class ClassBalancedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of ``batch_size`` indices made of groups of ``samples_per_class`` images of one class.

    Semantics of one epoch:

    * Every training image is visited exactly once, except that (a) a class whose image count is
      not a multiple of ``m = samples_per_class`` has its last group filled up with repeats of its
      own images drawn at random (other images of the class first, so a group repeats an image
      only when the class has fewer than ``m`` images), and (b) the final batch is topped up with
      groups drawn at random from the epoch's groups (of classes not yet in that batch where
      possible). Hence ``len(sampler) = ceil(num_groups / (batch_size / m))`` with
      ``num_groups = sum_c ceil(n_c / m)``.
    * No class appears twice in a batch unless unavoidable (fewer classes than groups per batch,
      or a class with more groups than there are batches): batches are filled by weighted random
      draws of distinct classes, forcing in any class that would otherwise have to repeat later.
    * The order is a deterministic function of ``(seed, epoch)`` and the labels. Call `set_epoch`
      at the start of every epoch (like ``DistributedSampler``), otherwise every epoch repeats.
    * With ``num_replicas > 1`` each global batch is cut into ``num_replicas`` contiguous equal parts
      and rank ``r`` gets part ``r``; the union over ranks is exactly the global batch. Groups stay
      whole when ``batch_size / num_replicas`` is a multiple of ``m``. All ranks must pass the same
      labels, seed and epoch.

    Args:
        labels: Class label of every dataset index.
        batch_size: Global batch size (over all replicas); a multiple of ``samples_per_class``.
        samples_per_class: Images per class group, ``m >= 1``.
        seed: Seed of the order (``>= 0``).
        num_replicas: Number of data-parallel processes; must divide ``batch_size``.
        rank: This process's rank, ``0 <= rank < num_replicas``.

    Raises:
        ValueError: An argument violates the constraints above (the message names it).
    """

    def __init__(
        self,
        labels: Sequence[int] | torch.Tensor,
        batch_size: int,
        samples_per_class: int,
        *,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        labels = labels.tolist() if isinstance(labels, (torch.Tensor, np.ndarray)) else list(labels)
        if not labels:
            raise ValueError("labels must be non-empty")
        m = _check_int("samples_per_class", samples_per_class, 1)
        batch_size = _check_int("batch_size", batch_size, 1)
        if batch_size % m:
            raise ValueError(f"batch_size ({batch_size}) must be a multiple of samples_per_class ({m})")
        num_replicas = _check_int("num_replicas", num_replicas, 1)
        if batch_size % num_replicas:
            raise ValueError(f"batch_size ({batch_size}) must be a multiple of num_replicas ({num_replicas})")
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be an int in [0, num_replicas={num_replicas}), got {rank!r}")
        self.seed = _check_int("seed", seed, 0)
        self.batch_size = batch_size
        self.samples_per_class = m
        self.num_replicas = num_replicas
        self.rank = int(rank)
        self.epoch = 0
        by_class: dict[int, list[int]] = {}
        for i, y in enumerate(labels):
            by_class.setdefault(int(y), []).append(i)
        # classes in sorted order, each with its indices ascending: independent of input ordering quirks
        self._classes = [np.asarray(by_class[c], dtype=np.int64) for c in sorted(by_class)]
        self._groups_per_class = np.array([math.ceil(len(ix) / m) for ix in self._classes], dtype=np.int64)
        self.num_groups = int(self._groups_per_class.sum())
        self.groups_per_batch = batch_size // m

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch whose order `__iter__` yields (call at the start of every epoch).

        Args:
            epoch: the epoch, an int ≥ 0.

        Raises:
            ValueError: if ``epoch`` is not an int ≥ 0.
        """
        self.epoch = _check_int("epoch", epoch, 0)

    def __len__(self) -> int:
        return math.ceil(self.num_groups / self.groups_per_batch)

    # ----------------------------------------------------------------------------------------------

    def _class_groups(self, rng: np.random.Generator) -> list[np.ndarray]:
        """Per class, its shuffled images cut into groups of m: array [groups_c, m]."""
        m = self.samples_per_class
        out = []
        for ix in self._classes:
            ix = rng.permutation(ix)
            short = -len(ix) % m
            if short:
                last = ix[len(ix) - (len(ix) % m) :]
                # fill up with images not already in the last group; repeat the class if it is too small
                pool = ix[: len(ix) - len(last)] if len(ix) > len(last) else ix
                reps = math.ceil(short / len(pool))
                fill = np.concatenate([rng.permutation(pool) for _ in range(reps)])[:short]
                ix = np.concatenate([ix, fill])
            out.append(ix.reshape(-1, m))
        return out

    def _pick(self, remaining: np.ndarray, capacity: int, later_batches: int, rng: np.random.Generator) -> list[int]:
        """Classes (with repetition only if unavoidable) of the ``capacity`` groups of one batch."""
        chosen: list[int] = []
        # a class with more remaining groups than batches left after this one must repeat somewhere:
        # take the excess now (largest first) so it cannot pile up at the end
        excess = np.maximum(remaining - later_batches, 0)
        if excess.any():
            order = np.lexsort((rng.random(len(remaining)), -excess))
            for c in order[: np.count_nonzero(excess)]:
                take = min(int(excess[c]), capacity - len(chosen))
                chosen.extend([int(c)] * take)
                if len(chosen) == capacity:
                    return chosen
        # distinct classes, drawn with probability ~ remaining groups (Efraimidis-Spirakis keys),
        # while any are left; then repeat classes if the batch is still not full
        left = remaining.copy()
        np.subtract.at(left, np.asarray(chosen, dtype=np.int64), 1)
        taken = np.zeros(len(remaining), dtype=bool)
        taken[chosen] = True
        while len(chosen) < capacity and left.sum() > 0:
            avail = np.flatnonzero((left > 0) & ~taken)
            if len(avail) == 0:
                taken[:] = False
                continue
            keys = np.log(rng.random(len(avail))) / left[avail]
            pick = avail[np.argsort(-keys, kind="stable")[: capacity - len(chosen)]]
            chosen.extend(int(c) for c in pick)
            left[pick] -= 1
            taken[pick] = True
        return chosen

    def global_batches(self, epoch: int | None = None) -> list[list[int]]:
        """All global batches of an epoch (default: the one set by `set_epoch`).

        Args:
            epoch: the epoch, an int ≥ 0 (default: ``self.epoch``).

        Returns:
            ``len(self)`` lists of ``batch_size`` dataset indices each (the whole global batch, before
            the split over replicas that `__iter__` applies).

        Raises:
            ValueError: if ``epoch`` is not an int ≥ 0.
        """
        epoch = self.epoch if epoch is None else _check_int("epoch", epoch, 0)
        rng = np.random.default_rng([self.seed, epoch])
        groups = self._class_groups(rng)
        remaining = self._groups_per_class.copy()
        cursor = np.zeros(len(groups), dtype=np.int64)
        g = self.groups_per_batch
        n_batches = len(self)
        # schedule the short batch first (all later ones are full, which keeps the "must repeat"
        # bookkeeping exact) but emit it last, where it gets topped up
        short = self.num_groups - (n_batches - 1) * g
        capacities = [short] + [g] * (n_batches - 1)
        batches: list[list[tuple[int, np.ndarray]]] = []
        for b, cap in enumerate(capacities):
            batch = []
            for c in self._pick(remaining, cap, n_batches - 1 - b, rng):
                batch.append((c, groups[c][cursor[c]]))
                cursor[c] += 1
                remaining[c] -= 1
            batches.append([batch[k] for k in rng.permutation(len(batch))])
        last = batches.pop(0)
        need = g - len(last)
        if need:
            # top up with random groups, of classes not in the batch where there are enough of them
            present = {c for c, _ in last}
            others = np.array([c for c in range(len(groups)) if c not in present], dtype=np.int64)
            if len(others) >= need:
                extra = rng.choice(others, size=need, replace=False)
            else:
                extra = np.concatenate([others, rng.choice(len(groups), size=need - len(others))])
            last = last + [(int(c), groups[c][rng.integers(len(groups[c]))]) for c in extra]
        batches.append(last)
        return [np.concatenate([grp for _, grp in batch]).tolist() for batch in batches]

    def __iter__(self) -> Iterator[list[int]]:
        part = self.batch_size // self.num_replicas
        lo = self.rank * part
        for batch in self.global_batches():
            yield batch[lo : lo + part]
