"""The one evaluation of a trained model on the test split, used by ``dml.train`` and ``dml.evaluate``.

`evaluate_final` takes the test embeddings (`dml.pipeline.evaluation_embeddings` — what a training run's
pipeline computes), computes the retrieval and clustering metrics and, for the losses whose embedding
norm is a vMF concentration, the uncertainty metrics of κ = ‖e‖ with the degradation test on
``degradation_images`` test images. Every option has one meaning in both tools, so re-evaluating a run
with its own settings reproduces the numbers of its training run. Results are typed dataclasses;
``to_json()`` gives what ``final_metrics.json`` holds.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from dml.config import ConfigError, TrainConfig
from dml.data import DatasetError, Split
from dml.metrics import cross_domain_metrics, evaluate_embeddings
from dml.models import EmbeddingModel
from dml.uncertainty import UncertaintyDetails, evaluate_uncertainty, kappa_is_concentration

#: the k of Recall@k reported everywhere
RECALL_KS = (1, 2, 4, 8)
#: the key suffix of the cross-domain metrics in ``final_metrics.json``
_CROSS = "_cross_domain"


def _rounded(value: float | None, digits: int = 4) -> str:
    """A number for the console: rounded to ``digits`` decimals, ``n/a`` when undefined."""
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.{digits}f}"


@dataclass(frozen=True)
class RetrievalMetrics:
    """Leave-one-out retrieval and clustering metrics of one set of embeddings (`dml.metrics`).

    Attributes:
        recall: Recall@k by k (cosine similarity).
        map_at_r: MAP@R (cosine).
        r_precision: R-precision (cosine).
        recall_euclidean: Recall@k by k (Euclidean distance of the raw embeddings).
        map_at_r_euclidean: MAP@R (Euclidean).
        r_precision_euclidean: R-precision (Euclidean).
        num_queries: the queries (images with at least one other image of their class).
        nmi: NMI of k-means clusters, or None when not computed.
        cross_domain: the cross-domain retrieval metrics (`dml.metrics.cross_domain_metrics`: a query
            searches only the other domains' images, e.g. the other artists' emoji): ``recall@k``,
            ``map@r``, ``r_precision``, ``num_queries``; None for data without domains.
    """

    recall: dict[int, float]
    map_at_r: float
    r_precision: float
    recall_euclidean: dict[int, float]
    map_at_r_euclidean: float
    r_precision_euclidean: float
    num_queries: int
    nmi: float | None = None
    cross_domain: dict[str, float] | None = None

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RetrievalMetrics:
        """Read the flat dict of `dml.metrics.evaluate_embeddings` (or `to_json`).

        Args:
            values: ``{"recall@1": …, "map@r": …, …}``.

        Returns:
            The metrics.
        """
        ks = sorted(int(k.split("@")[1]) for k in values if k.startswith("recall@") and "_" not in k)
        return cls(recall={k: float(values[f"recall@{k}"]) for k in ks}, map_at_r=float(values["map@r"]),
                   r_precision=float(values["r_precision"]),
                   recall_euclidean={k: float(values[f"recall@{k}_euclidean"]) for k in ks
                                     if f"recall@{k}_euclidean" in values},
                   map_at_r_euclidean=float(values.get("map@r_euclidean", math.nan)),
                   r_precision_euclidean=float(values.get("r_precision_euclidean", math.nan)),
                   num_queries=int(values.get("num_queries", 0)),
                   nmi=None if values.get("nmi") is None else float(values["nmi"]),
                   cross_domain={k.removesuffix(_CROSS): (int(v) if k.startswith("num_queries") else float(v))
                                 for k, v in values.items() if k.endswith(_CROSS)} or None)

    def to_json(self) -> dict[str, Any]:
        """The flat JSON form: ``recall@k``, ``map@r``, ``r_precision``, their ``_euclidean`` twins, ``nmi``,
        and the cross-domain metrics with the suffix ``_cross_domain``.

        Returns:
            A JSON-serialisable dict.
        """
        out: dict[str, Any] = {f"recall@{k}": v for k, v in self.recall.items()}
        out.update({"map@r": self.map_at_r, "r_precision": self.r_precision})
        out.update({f"recall@{k}_euclidean": v for k, v in self.recall_euclidean.items()})
        out.update({"map@r_euclidean": self.map_at_r_euclidean, "r_precision_euclidean": self.r_precision_euclidean,
                    "num_queries": self.num_queries})
        if self.nmi is not None:
            out["nmi"] = self.nmi
        if self.cross_domain:
            out.update({k + _CROSS: v for k, v in self.cross_domain.items()})
        return out

    def summary(self) -> str:
        """One console line: R@1, R@4, MAP@R and NMI (and cross-domain R@1 and MAP@R), four decimals."""
        line = (f"R@1 {_rounded(self.recall.get(1))}  R@4 {_rounded(self.recall.get(4))}  "
                f"MAP@R {_rounded(self.map_at_r)}  NMI {_rounded(self.nmi)}")
        if self.cross_domain:
            line += (f"  cross-domain R@1 {_rounded(self.cross_domain.get('recall@1'))}  "
                     f"MAP@R {_rounded(self.cross_domain.get('map@r'))}")
        return line


@dataclass(frozen=True)
class UncertaintyResult:
    """The uncertainty metrics of κ = ‖e‖ (`dml.uncertainty.evaluate_uncertainty`).

    Attributes:
        auroc_kappa: AUROC of κ for "the 1-NN is correct" (None: undefined).
        spearman_kappa_ap: Spearman ρ between κ and the query's AP@R (None: undefined).
        mean_kappa: mean κ over the test images.
        std_kappa: its standard deviation.
        mean_kappa_correct: mean κ of the queries whose 1-NN is correct (None: there are none).
        mean_kappa_wrong: mean κ of the others (None: there are none).
        recall_at_1: R@1 of all queries.
        num_queries: the queries.
        num_correct: the queries whose 1-NN is correct.
        rejection_curve: ``[fraction rejected, R@1 of the rest]`` pairs.
        degradation: the result of `dml.uncertainty.degradation_test` (JSON dict), or None when skipped.
    """

    auroc_kappa: float | None
    spearman_kappa_ap: float | None
    mean_kappa: float
    std_kappa: float
    mean_kappa_correct: float | None
    mean_kappa_wrong: float | None
    recall_at_1: float
    num_queries: int
    num_correct: int
    rejection_curve: list[list[float]]
    degradation: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> UncertaintyResult:
        """Read the dict of `dml.uncertainty.evaluate_uncertainty` (or `to_json`).

        Args:
            values: the dict.

        Returns:
            The result.
        """
        return cls(auroc_kappa=values["auroc_kappa"], spearman_kappa_ap=values["spearman_kappa_ap"],
                   mean_kappa=values["mean_kappa"], std_kappa=values["std_kappa"],
                   mean_kappa_correct=values["mean_kappa_correct"], mean_kappa_wrong=values["mean_kappa_wrong"],
                   recall_at_1=values["recall@1"], num_queries=values["num_queries"],
                   num_correct=values["num_correct"], rejection_curve=[list(p) for p in values["rejection_curve"]],
                   degradation=values.get("degradation"))

    def to_json(self) -> dict[str, Any]:
        """The JSON form (the keys of `dml.uncertainty.evaluate_uncertainty`).

        Returns:
            A JSON-serialisable dict.
        """
        return {"auroc_kappa": self.auroc_kappa, "spearman_kappa_ap": self.spearman_kappa_ap,
                "mean_kappa": self.mean_kappa, "std_kappa": self.std_kappa,
                "mean_kappa_correct": self.mean_kappa_correct, "mean_kappa_wrong": self.mean_kappa_wrong,
                "recall@1": self.recall_at_1, "num_queries": self.num_queries, "num_correct": self.num_correct,
                "rejection_curve": self.rejection_curve, "degradation": self.degradation}

    def summary(self) -> str:
        """One console line, numbers rounded to four decimals (``n/a`` when undefined)."""
        spearman = None if self.degradation is None else self.degradation.get("mean_spearman")
        return (f"uncertainty: AUROC(κ → 1-NN correct) {_rounded(self.auroc_kappa)}  "
                f"Spearman(κ, AP@R) {_rounded(self.spearman_kappa_ap)}  "
                f"Spearman(κ, degradation strength) {_rounded(spearman)}")


@dataclass(frozen=True)
class FinalEvaluation:
    """The test evaluation of one model (`evaluate_final`).

    Attributes:
        metrics: retrieval and clustering metrics.
        uncertainty: the uncertainty metrics, or None (a loss whose norm is no concentration, or off).
        details: per-image values behind the uncertainty metrics, for the report's plots (not JSON).
        degradation_images: the images the degradation test used (0: skipped).
    """

    metrics: RetrievalMetrics
    uncertainty: UncertaintyResult | None
    details: UncertaintyDetails | None = field(default=None, compare=False, repr=False)
    degradation_images: int = 0


def wants_uncertainty(loss: str, mode: str = "auto") -> bool:
    """Whether the uncertainty metrics are computed: ``auto`` for the vMF-based losses only, ``on``, ``off``.

    Args:
        loss: the run's loss name.
        mode: ``"auto"``, ``"on"`` or ``"off"``.

    Returns:
        The decision.

    Raises:
        ConfigError: for another mode or an unknown loss.
    """
    if mode not in ("auto", "on", "off"):
        raise ConfigError(f"--uncertainty must be auto, on or off, got {mode!r}")
    try:
        return mode == "on" or (mode == "auto" and kappa_is_concentration(loss))
    except ValueError as err:
        raise ConfigError(str(err)) from None


def split_metrics(embeddings: torch.Tensor, labels: torch.Tensor, *, seed: int, with_nmi: bool = True,
                  split_name: str = "test", domains: tuple[str, ...] = ()) -> RetrievalMetrics:
    """`dml.metrics.evaluate_embeddings` as typed metrics, a split without queries as a `DatasetError`.

    Args:
        embeddings: ``[N, D]`` embeddings.
        labels: ``[N]`` labels.
        seed: seed of the k-means initialisation.
        with_nmi: compute the NMI.
        split_name: the split's name for the error message.
        domains: the domain of each item (`dml.data.Split.domains`); with two or more distinct ones the
            cross-domain metrics are computed too.

    Returns:
        The metrics.

    Raises:
        DatasetError: if no class of the split has two images.
    """
    try:
        metrics = RetrievalMetrics.from_dict(evaluate_embeddings(embeddings, labels, seed=seed, with_nmi=with_nmi))
    except ValueError as err:
        raise DatasetError(f"{split_name} split: {err}") from None
    if len(set(domains)) < 2:
        return metrics
    index = {d: i for i, d in enumerate(sorted(set(domains)))}
    ids = torch.tensor([index[d] for d in domains], dtype=torch.int64)
    try:
        cross = cross_domain_metrics(embeddings, labels, ids, ks=RECALL_KS)
    except ValueError as err:
        if "another domain" in str(err):  # no class drawn in two domains: nothing to report
            return metrics
        raise
    cross["num_queries"] = int(cross["num_queries"])
    return dataclasses.replace(metrics, cross_domain=cross)


def evaluate_final(model: EmbeddingModel, test_split: Split, embeddings: torch.Tensor, labels: torch.Tensor, *,
                   config: TrainConfig, device: torch.device, resolution: int, uncertainty: bool,
                   metrics: RetrievalMetrics | None = None) -> FinalEvaluation:
    """Evaluate a model on the test split: the metrics, and the uncertainty of κ if asked for.

    Args:
        model: the model (the checkpoint's weights), on ``device``.
        test_split: the test split (same order as the embeddings).
        embeddings: its ``[N, D]`` embeddings (`dml.pipeline.evaluation_embeddings` or the pipeline's).
        labels: their ``[N]`` labels.
        config: supplies ``seed``, ``eval_batch_size`` and ``degradation_images`` (0: no degradation test).
        device: where the degradation test runs the model.
        resolution: the evaluation crop size.
        uncertainty: compute the uncertainty metrics (`wants_uncertainty`).
        metrics: the retrieval metrics when the caller already has them (under DDP, computed on rank 0).

    Returns:
        The `FinalEvaluation`.

    Raises:
        DatasetError: no test class with two images, or a test image that cannot be decoded.
    """
    metrics = metrics or split_metrics(embeddings, labels, seed=config.seed, domains=test_split.domains)
    if not uncertainty:
        return FinalEvaluation(metrics=metrics, uncertainty=None)
    values, details = evaluate_uncertainty(
        model, test_split, embeddings, labels, resolution=resolution, device=device,
        batch_size=min(config.eval_batch_size, 64), seed=config.seed, degradation_images=config.degradation_images)
    count = 0 if values["degradation"] is None else values["degradation"]["num_images"]
    return FinalEvaluation(metrics=metrics, uncertainty=UncertaintyResult.from_dict(values), details=details,
                           degradation_images=count)


@dataclass(frozen=True)
class TrainingResult:
    """What a training run reports (``final_metrics.json``), built by ``dml.train``.

    Attributes:
        final: the test evaluation of the selected checkpoint.
        initial: the test metrics before training.
        last_epoch: the test metrics of the last epoch's weights.
        selected_epoch: the epoch of the selected checkpoint.
        selection: how it was selected.
        trunk: ``frozen``, ``partial`` or ``finetune``.
        device: the run's device.
        wall_time_s: this invocation's wall time (a resumed run: since resuming).
        world_size: the number of processes (1 without DDP).
    """

    final: FinalEvaluation
    initial: RetrievalMetrics
    last_epoch: RetrievalMetrics
    selected_epoch: int
    selection: str
    trunk: str
    device: str
    wall_time_s: float
    world_size: int = 1

    def to_json(self) -> dict[str, Any]:
        """The JSON form: the selected checkpoint's metrics at the top level, then the rest by name.

        Returns:
            A JSON-serialisable dict (what ``final_metrics.json`` holds).
        """
        out = {
            **self.final.metrics.to_json(),
            "recall@1_initial": self.initial.recall.get(1),
            "selected_epoch": self.selected_epoch,
            "selection": self.selection,
            "last_epoch": self.last_epoch.to_json(),
            "initial": self.initial.to_json(),
            "trunk": self.trunk,
            "device": self.device,
            "wall_time_s": self.wall_time_s,
            "uncertainty": None if self.final.uncertainty is None else self.final.uncertainty.to_json(),
        }
        if self.world_size > 1:
            out["world_size"] = self.world_size
        return out


@dataclass(frozen=True)
class EvaluateResult:
    """What ``dml.evaluate`` reports (stored under ``"evaluate"`` in ``final_metrics.json``).

    Attributes:
        final: the test evaluation of the checkpoint.
        checkpoint: ``best`` or ``last``.
        epoch: the checkpoint's epoch, if recorded.
        device: where it ran.
        resolution: the evaluation crop size.
        wall_time_s: the evaluation's wall time.
    """

    final: FinalEvaluation
    checkpoint: str
    epoch: int | None
    device: str
    resolution: int
    wall_time_s: float

    def to_json(self) -> dict[str, Any]:
        """The JSON form: the metrics at the top level, then the rest by name.

        Returns:
            A JSON-serialisable dict.
        """
        return {**self.final.metrics.to_json(), "checkpoint": self.checkpoint, "epoch": self.epoch,
                "device": self.device, "resolution": self.resolution,
                "degradation_images": self.final.degradation_images,
                "uncertainty": None if self.final.uncertainty is None else self.final.uncertainty.to_json(),
                "wall_time_s": self.wall_time_s}
