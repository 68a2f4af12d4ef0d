"""Every option of a training run: its type, default, choices and validation (one place each).

Values come from the defaults below, a ``--config`` file (TOML, YAML or JSON) and command-line flags, in
increasing precedence. The effective configuration is written to ``OUTPUT/config.json`` (itself a valid
``--config`` file). Values are never silently "fixed": a wrong type or an impossible number is a
`ConfigError` naming the option and the constraint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from dml.data.datasets import DATASETS, DatasetError
from dml.data.emoji import DEFAULT_EMOJI_ARTISTS, EMOJI_ARTISTS, parse_artists
from dml.losses import LOSSES
from dml.models import BACKBONES, POOLINGS


class ConfigError(ValueError):
    """A config file or value that cannot be used (one-line message naming the option)."""


#: validation metrics that may select the checkpoint (``--selection-metric``)
SELECTION_METRICS = ("recall@1", "recall@2", "recall@4", "recall@8", "map@r", "r_precision", "nmi",
                     "recall@1_euclidean", "recall@2_euclidean", "recall@4_euclidean", "recall@8_euclidean",
                     "map@r_euclidean", "r_precision_euclidean")

#: the allowed values of every option with a fixed set of choices
CHOICES: dict[str, tuple[str, ...]] = {
    "dataset": DATASETS,
    "backbone": BACKBONES,
    "pooling": POOLINGS,
    "trunk": ("auto", "frozen", "partial", "finetune"),
    "amp": ("auto", "bf16", "off"),
    "channels_last": ("auto", "on", "off"),
    "device_augment": ("auto", "on", "off"),
    "loss": tuple(LOSSES),
    "optimizer": ("adamw", "adam"),
    "scheduler": ("cosine", "constant"),
    "selection_metric": SELECTION_METRICS,
}

#: the epochs of ``--epochs 0`` per trunk mode (partial: on the emoji benchmark the validation-selected
#: epoch was 13 or 14 of 20 over three seeds)
DEFAULT_EPOCHS = {"frozen": 40, "partial": 20, "finetune": 30}

#: the trunk's learning-rate multiplier under ``--trunk partial`` (``trunk_lr_mult`` 0): on the emoji
#: benchmark 3 had the best validation R@1 (0.694, seed 0; 1 × 0.660; every rate at 1e-3 collapsed) and gave
#: test R@1 0.471 / 0.472 / 0.473 over seeds 0-2 (1 ×: 0.436, seed 0)
PARTIAL_TRUNK_LR_MULT = 3.0

#: the options that a resumed run may change (``--resume DIR --epochs N`` extends a run)
RESUME_OVERRIDES = ("epochs",)


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    """Hyperparameters of ``python -m dml.train`` (flags use dashes: ``embed_dim`` → ``--embed-dim``).

    Every field is also a command-line flag (`build_parser`) and a config-file key; the help text of
    the flags is the field's ``help`` metadata. Build one with `parse_config` or `config_from_dict`; check
    it with `validate`.

    Attributes:
        output_dir: run directory: config, checkpoints, logs, ``final_metrics.json``. Default ``"runs/demo"``.
        dataset: ``emoji``, ``folder``, ``cub200``, ``cars196`` or ``sop``. Default ``"emoji"``.
        data_root: dataset location (emoji: found automatically after setup). Default None.
        emoji_artists: emoji only: the artists whose renderings are the images of a class, comma-separated
            (`dml.data.emoji.EMOJI_ARTISTS`). Default ``"google,twitter,openmoji,fluent"``.
        val_fraction: fraction of the training classes held out for model selection. Default 0.2.
        split_seed: seed of the class split (kept fixed across training seeds). Default 0.
        backbone: ``efficientnet_lite0``, ``resnet50`` or ``tiny``. Default ``"efficientnet_lite0"``.
        weights: backbone weights: ``"default"`` (packaged Lite0 ImageNet weights), a path, or ``"none"``.
            Default ``"default"``.
        embed_dim: embedding dimension $p$. Default 128.
        pooling: ``avg``, ``max`` or ``avgmax``. Default ``"avg"``.
        freeze_batchnorm: keep BatchNorm statistics frozen (as in the paper). Default True.
        trunk: ``finetune`` (the whole network trains), ``partial`` (the trunk's last stage and the head
            train, on cached activations of the frozen rest), ``frozen`` (only the head trains, on cached
            features) or ``auto`` (partial on CPU, finetune on GPU). Default ``"auto"``.
        feature_views: frozen or partial trunk: views per training image whose features (activations) are
            cached (1: the centre crop only; more add random-resized-crop + flip views). Default 1.
        amp: mixed precision of the network: ``auto`` (bf16 on CUDA, off on CPU), ``bf16`` or ``off``; the
            embedding head and the vMF parts of the losses run in float32/float64 regardless. Default
            ``"auto"``.
        channels_last: channels-last memory format: ``auto`` (on CUDA), ``on`` or ``off``. Default ``"auto"``.
        device_augment: fine-tuning with the images on the device (`dml.pipeline.DeviceImagePipeline`):
            ``auto`` (on CUDA when they fit), ``on`` or ``off``. Default ``"auto"``.
        compile: ``torch.compile`` the trunk's forward. Default False.
        feature_cache: frozen or partial trunk: a directory where the cached features are saved and reused across runs
            (keyed by the image paths, backbone, weights, pooling, resolution, views). Default None.
        resolution: input crop size (0: the backbone's own, 224 for Lite0 / ResNet-50). Default 0.
        loss: a name of `dml.losses.LOSSES` (``el_nivmf``, ``el_nivmf_paper``, ``el_vmf``, ``ppk_vmf``,
            ``kl_vmf``, ``proxy_anchor``, ``proxy_nca``, ``norm_softmax``, ``l2``, ``cosine``).
            Default ``"el_nivmf"``.
        loss_options: the loss's keyword options (`dml.losses.loss_options`), e.g. from
            ``--loss-option guidance_weight=1.0``. Default ``{}``.
        init_norm: initial mean embedding norm κ, set by a fixed head output scale (0: the loss's
            default, 2.5 × ``embed_dim`` for the vMF losses). Default 0.
        epochs: training epochs (0: a default that fits the trunk: 40 frozen, 20 partial, 30 fine-tuning). Default 0.
        batch_size: images per batch — the global batch under torchrun, split over the processes. Default 112.
        samples_per_class: images of one class per batch group ($m$). Default 2.
        optimizer: ``adamw`` or ``adam``. Default ``"adamw"``.
        lr: base learning rate (0: 1e-4); the head gets ``head_lr_mult`` ×, the loss's groups their own
            multipliers. Default 0.
        head_lr_mult: learning-rate multiplier of the embedding head. Default 10.
        trunk_lr_mult: learning-rate multiplier of the trunk's trained layers (0: 3 for ``--trunk partial``,
            whose few trained layers learn best a little faster, 1 otherwise). Default 0.
        weight_decay: AdamW weight decay of the network (loss parameters get none). Default 1e-4.
        scheduler: ``cosine`` or ``constant`` (per step, after warm-up). Default ``"cosine"``.
        warmup_epochs: linear warm-up length in epochs. Default 1.
        grad_clip: clip the gradient norm of the network (0: off). Default 10.
        seed: seed of initialisation, sampling and augmentation. Default 0.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``. Default ``"auto"``.
        eval_batch_size: images per batch when embedding for evaluation. Default 256.
        log_every: steps between loss logs (one host sync each). Default 50.
        degradation_images: test images in the degradation test of κ (vMF losses; 0: skip the test). The
            same number in ``dml.train`` and ``dml.evaluate``. Default 64.
        selection_metric: validation metric that selects the checkpoint (`SELECTION_METRICS`).
            Default ``"recall@1"``.
    """

    output_dir: str = _opt("runs/demo", "run directory: config, checkpoints, logs, final_metrics.json")
    dataset: str = _opt("emoji", "emoji | folder | cub200 | cars196 | sop")
    data_root: str | None = _opt(None, "dataset location (emoji: found automatically after setup)")
    emoji_artists: str = _opt(",".join(DEFAULT_EMOJI_ARTISTS), "emoji: the artists whose renderings are a class's "
                              f"images, comma-separated, at least two of {', '.join(EMOJI_ARTISTS)}")
    val_fraction: float = _opt(0.2, "fraction of the training classes held out for model selection")
    split_seed: int = _opt(0, "seed of the class split (kept fixed across training seeds)")
    backbone: str = _opt("efficientnet_lite0", "efficientnet_lite0 | resnet50 | tiny")
    weights: str = _opt("default", "backbone weights: 'default' (packaged Lite0 ImageNet weights), a path, or 'none'")
    embed_dim: int = _opt(128, "embedding dimension p")
    pooling: str = _opt("avg", "avg | max | avgmax")
    freeze_batchnorm: bool = _opt(True, "keep BatchNorm statistics frozen (as in the paper)")
    trunk: str = _opt("auto", "finetune | partial | frozen | auto (partial on CPU, finetune on GPU): partial trains "
                              "the trunk's last stage and the head on cached activations, frozen only the head")
    feature_views: int = _opt(1, "frozen or partial trunk: views per training image whose features are cached (1: "
                              "the centre crop only; more add random-resized-crop + flip views)")
    amp: str = _opt("auto", "mixed precision of the network: auto (bf16 on CUDA, off on CPU) | bf16 | off")
    channels_last: str = _opt("auto", "channels-last memory format for the network: auto (on CUDA) | on | off")
    device_augment: str = _opt("auto", "fine-tuning: images as uint8 on the device, crops by grid_sample: auto (on "
                                       "CUDA when they fit in 40 percent of free memory) | on | off")
    compile: bool = _opt(False, "torch.compile the trunk's forward")
    feature_cache: str | None = _opt(None, "frozen or partial trunk: directory where cached features are kept and "
                                           "reused across runs (keyed by data, backbone, weights, resolution, views)")
    resolution: int = _opt(0, "input crop size (0: the backbone's own, 224 for Lite0 / ResNet-50)")
    loss: str = _opt("el_nivmf", "el_nivmf | el_nivmf_paper | el_vmf | ppk_vmf | kl_vmf | proxy_anchor | proxy_nca | "
                                 "norm_softmax | l2 | cosine")
    loss_options: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "loss keyword options, e.g. --loss-option guidance_weight=1.0 (repeatable)"})
    init_norm: float = _opt(0.0, "initial mean embedding norm κ, set by a fixed head output scale (0: the loss's "
                            "default, 2.5 × embed_dim for the vMF losses)")
    epochs: int = _opt(0, "training epochs (0: a default that fits the trunk: 40 frozen, 20 partial, 30 fine-tuning)")
    batch_size: int = _opt(112, "images per batch (the global batch under torchrun, split over the processes)")
    samples_per_class: int = _opt(2, "images of one class per batch group (m)")
    optimizer: str = _opt("adamw", "adamw | adam")
    lr: float = _opt(0.0, "base learning rate (0: 1e-4); the head gets head_lr_mult ×, the loss's groups their own "
                          "multipliers")
    head_lr_mult: float = _opt(10.0, "learning-rate multiplier of the embedding head")
    trunk_lr_mult: float = _opt(0.0, "learning-rate multiplier of the trunk's trained layers (0: 3 for --trunk "
                                     "partial, 1 otherwise)")
    weight_decay: float = _opt(1e-4, "AdamW weight decay of the network (loss parameters get none)")
    scheduler: str = _opt("cosine", "cosine | constant (per step, after warmup)")
    warmup_epochs: float = _opt(1.0, "linear warm-up length in epochs")
    grad_clip: float = _opt(10.0, "clip the gradient norm of the network (0: off)")
    seed: int = _opt(0, "seed of initialisation, sampling and augmentation")
    device: str = _opt("auto", "auto | cpu | cuda | cuda:N")
    eval_batch_size: int = _opt(256, "images per batch when embedding for evaluation")
    log_every: int = _opt(50, "steps between loss logs (one host sync each)")
    degradation_images: int = _opt(64, "test images in the degradation test of κ (vMF losses; 0: skip it)")
    selection_metric: str = _opt("recall@1", "validation metric that selects the checkpoint")

    def to_dict(self) -> dict[str, Any]:
        """The configuration as a plain dict (what ``config.json`` holds; `config_from_dict` reads it back).

        Returns:
            ``{field name: value}`` for every field.
        """
        return dataclasses.asdict(self)


def flag(name: str) -> str:
    """The command-line flag of a field: ``embed_dim`` → ``--embed-dim`` (``loss_options``: ``--loss-option``).

    Args:
        name: a `TrainConfig` field name.

    Returns:
        The flag.
    """
    return "--loss-option" if name == "loss_options" else "--" + name.replace("_", "-")


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_BOOLEAN_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


# --------------------------------------------------------------------------------------------------
# types: values from files are checked, never converted ("1.9" is no integer, true is no number)


def _kind(name: str) -> str:
    return str(_FIELDS[name].type).replace(" ", "")


def _typed(name: str, value: Any) -> Any:
    """``value`` if it has the type of field ``name`` (an int is accepted for a float), else `ConfigError`."""
    kind = _kind(name)
    if value is None and kind.endswith("|None"):
        return None
    expected: str
    if kind == "int":
        ok, expected = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif kind == "float":
        ok, expected = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        value = float(value) if ok else value
    elif kind == "bool":
        ok, expected = isinstance(value, bool), "true or false"
    elif name == "loss_options":
        ok, expected = isinstance(value, dict) and all(isinstance(k, str) for k in value), "a table of KEY = VALUE"
        value = {k.replace("-", "_"): v for k, v in value.items()} if ok else value
    else:
        ok, expected = isinstance(value, str), "a string"
    if not ok:
        raise ConfigError(f"{name} must be {expected}, got {value!r} ({type(value).__name__})")
    return value


def _parse_value(text: str) -> Any:
    """A ``--loss-option`` value: JSON if it parses (numbers, booleans, lists), else a boolean word or the string."""
    try:
        return json.loads(text)  # numbers first: guidance_weight=0 is the number 0, not False
    except json.JSONDecodeError:
        pass
    return _BOOLEAN_WORDS.get(text.lower(), text)


def _cli_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _cli_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


# --------------------------------------------------------------------------------------------------
# validation


def validate(config: TrainConfig) -> TrainConfig:
    """Check every value of ``config`` against its type, range and choices (nothing is changed).

    Args:
        config: the configuration.

    Returns:
        ``config`` itself, for chaining.

    Raises:
        ConfigError: naming the flag and the constraint of the first bad value.
    """
    for name in _FIELDS:
        _typed(name, getattr(config, name))
    for name, allowed in CHOICES.items():
        value = getattr(config, name)
        if value not in allowed:
            raise ConfigError(f"{flag(name)} must be one of {', '.join(allowed)}, got {value!r}")
    positive = ("embed_dim", "batch_size", "samples_per_class", "eval_batch_size", "log_every", "feature_views")
    for name in positive:
        if getattr(config, name) < 1:
            raise ConfigError(f"{flag(name)} must be a positive integer, got {getattr(config, name)}")
    zero_means = {"epochs": "0: the device's default", "resolution": "0: the backbone's own",
                  "degradation_images": "0: skip the degradation test", "seed": "", "split_seed": ""}
    for name, meaning in zero_means.items():
        if getattr(config, name) < 0:
            note = f" ({meaning})" if meaning else ""
            raise ConfigError(f"{flag(name)} must be an integer >= 0{note}, got {getattr(config, name)}")
    for name in ("lr", "weight_decay", "grad_clip", "init_norm", "warmup_epochs", "head_lr_mult", "trunk_lr_mult"):
        value = getattr(config, name)
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{flag(name)} must be a finite number >= 0, got {value}")
    if not 0 <= config.val_fraction < 1:
        raise ConfigError(f"--val-fraction must be in [0, 1), got {config.val_fraction}")
    if config.batch_size % config.samples_per_class:
        raise ConfigError(f"--batch-size {config.batch_size} must be a multiple of --samples-per-class "
                          f"{config.samples_per_class}")
    if not config.output_dir:
        raise ConfigError("--output-dir must not be empty")
    try:
        parse_artists(config.emoji_artists)
    except DatasetError as err:
        raise ConfigError(f"--emoji-artists: {str(err).removeprefix('emoji_artists: ')}") from None
    if config.dataset != "emoji" and config.emoji_artists != _FIELDS["emoji_artists"].default:
        raise ConfigError(f"--emoji-artists applies to --dataset emoji only, not {config.dataset}")
    return config


def resolve(config: TrainConfig, device_type: str) -> TrainConfig:
    """A copy of ``config`` with the device-dependent defaults filled in (``config`` is not changed).

    ``trunk="auto"`` becomes ``finetune`` on CUDA and ``partial`` elsewhere (on the emoji benchmark, 3 points
    of test R@1 above ``frozen`` in four minutes on two cores) — but ``finetune`` when ``weights="none"``,
    since a frozen random trunk gives random features; ``epochs`` 0 becomes
    `DEFAULT_EPOCHS` of the trunk (40 frozen, 20 partial, 30 fine-tuning); ``lr`` 0 becomes 1e-4;
    ``trunk_lr_mult`` 0 becomes `PARTIAL_TRUNK_LR_MULT` (partial) or 1.

    Args:
        config: a validated configuration.
        device_type: ``"cpu"`` or ``"cuda"``.

    Returns:
        The resolved configuration (what ``config.json`` records).
    """
    trunk = config.trunk
    if trunk == "auto":
        trunk = "finetune" if device_type == "cuda" or config.weights == "none" else "partial"
    epochs = config.epochs or DEFAULT_EPOCHS[trunk]
    trunk_lr_mult = config.trunk_lr_mult or (PARTIAL_TRUNK_LR_MULT if trunk == "partial" else 1.0)
    return dataclasses.replace(config, trunk=trunk, epochs=epochs, lr=config.lr or 1e-4, trunk_lr_mult=trunk_lr_mult)


# --------------------------------------------------------------------------------------------------
# files and flags


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Keys and values of a TOML, YAML or JSON file (by extension), type-checked.

    Args:
        path: a ``.toml``, ``.yaml`` / ``.yml`` or ``.json`` file holding one table; keys may use
            dashes or underscores.

    Returns:
        ``{field name: value}`` with dashes in the keys replaced by underscores.

    Raises:
        ConfigError: missing or unparsable file, another extension, a file that is not a table, an
            unknown key or a value of the wrong type.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise ConfigError(f"config file {path}: use a .toml, .yaml, .yml or .json file")
    try:
        text = path.read_text(encoding="utf-8")
        if suffix == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # Python 3.10: the backport, declared in the dml extra
                import tomli as tomllib
            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as err:  # noqa: BLE001 - any reader or parser error becomes one line
        raise ConfigError(f"cannot read config file {path}: {err}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table of keys")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"config file {path}: unknown key(s) {', '.join(unknown)}")
    try:
        return {k: _typed(k, v) for k, v in data.items()}
    except ConfigError as err:
        raise ConfigError(f"config file {path}: {err}") from None


class OneLineParser(argparse.ArgumentParser):
    """An `argparse.ArgumentParser` whose usage errors are one line on stderr (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        """Print ``error: MESSAGE (see PROG --help)`` and exit with status 2.

        Args:
            message: argparse's message.
        """
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m dml.train`` argument parser (defaults suppressed so that file values can win).

    Returns:
        An argument parser with one flag per `TrainConfig` field (booleans as ``--x`` / ``--no-x``,
        ``--loss-option KEY=VALUE`` repeatable), plus ``--config FILE`` and ``--resume DIR``; parsed
        namespaces contain only the flags given.
    """
    parser = OneLineParser(
        prog="python -m dml.train",
        description="Train an image-retrieval embedding with a proxy-based (probabilistic) metric-learning loss "
        "and evaluate it on classes never seen in training.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", metavar="FILE", help="TOML / YAML / JSON file with any of the options below")
    parser.add_argument("--resume", metavar="DIR", help="continue the run in DIR where it stopped (with --epochs N: "
                        "extend it to N epochs); no other flag is allowed")
    for f in dataclasses.fields(TrainConfig):
        default = "none" if f.default is dataclasses.MISSING else f.default
        help_text = f"{f.metadata['help']} (default: {default})".replace("%", "%%")  # argparse formats help
        choices = CHOICES.get(f.name)
        if f.name == "loss_options":
            parser.add_argument(flag(f.name), dest=f.name, action="append", metavar="KEY=VALUE", help=help_text)
        elif _kind(f.name) == "bool":
            parser.add_argument(flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            kind = {"int": _cli_int, "float": _cli_float}.get(_kind(f.name), str)
            parser.add_argument(flag(f.name), dest=f.name, type=kind, help=help_text, choices=choices,
                                metavar=f.name.upper() if choices else None)
    return parser


@dataclass(frozen=True)
class TrainRequest:
    """What the command line asks for: a new run, or resuming (and possibly extending) one.

    Attributes:
        config: the configuration of a new run (None when resuming: the run's saved one is used).
        resume: the run directory to resume, or None.
        overrides: options given with ``--resume`` (only `RESUME_OVERRIDES`: ``{"epochs": N}``).
    """

    config: TrainConfig | None
    resume: Path | None = None
    overrides: dict[str, Any] = field(default_factory=dict)


def parse_request(argv: list[str] | None = None) -> TrainRequest:
    """Parse the command line of ``python -m dml.train``.

    Args:
        argv: the command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The `TrainRequest`.

    Raises:
        ConfigError: as `parse_config`, or ``--resume`` with flags other than `RESUME_OVERRIDES`.
        SystemExit: from argparse on ``--help`` (status 0) or a bad flag (status 2, one line).
    """
    args = vars(build_parser().parse_args(sys.argv[1:] if argv is None else argv))
    resume = args.pop("resume", None)
    if resume is None:
        return TrainRequest(config=_config_from_args(args))
    others = sorted(k for k in args if k not in RESUME_OVERRIDES)
    if others:
        names = ", ".join("--config" if k == "config" else flag(k) for k in others)
        raise ConfigError(f"--resume continues a run with its saved configuration; only --epochs may be given "
                          f"with it (to extend the run), not {names}")
    overrides = {k: _typed(k, v) for k, v in args.items()}
    if "epochs" in overrides and overrides["epochs"] < 1:
        raise ConfigError(f"--epochs with --resume must be a positive integer, got {overrides['epochs']}")
    return TrainRequest(config=None, resume=Path(resume), overrides=overrides)


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Defaults, then ``--config`` file values, then flags: the validated configuration of a new run.

    ``--loss-option`` values are parsed as JSON where possible (numbers, booleans, lists), else as
    booleans (``true``/``yes``/``on``…) or strings, and update the file's ``loss_options``.

    Args:
        argv: the command-line arguments (default: ``sys.argv[1:]``), without ``--resume``.

    Returns:
        The effective `TrainConfig`.

    Raises:
        ConfigError: bad file, unknown key, malformed ``--loss-option``, a value of the wrong type or
            range, or ``--resume`` given.
        SystemExit: from argparse on an unknown flag or ``--help``.
    """
    request = parse_request(argv)
    if request.config is None:
        raise ConfigError("--resume continues a saved run: it has no configuration of its own to parse")
    return request.config


def _config_from_args(args: dict[str, Any]) -> TrainConfig:
    values: dict[str, Any] = {}
    if args.get("config"):
        values.update(read_config_file(args["config"]))
    args.pop("config", None)
    options = dict(values.get("loss_options") or {})
    for item in args.pop("loss_options", []) or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--loss-option expects KEY=VALUE, got {item!r}")
        options[key.strip().replace("-", "_")] = _parse_value(value.strip())
    values.update(args)
    values["loss_options"] = options
    return config_from_dict(values)


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """A validated `TrainConfig` from a dict such as ``config.json`` (unknown keys and wrong types rejected).

    Args:
        values: ``{field name: value}``; missing fields keep their defaults. The keys ``resume`` and
            ``config`` of configurations saved by earlier versions are ignored.

    Returns:
        The `TrainConfig` (``loss_options`` is ``{}`` when not given).

    Raises:
        ConfigError: on an unknown key, a value of the wrong type, or a value out of range.
    """
    values = {k: v for k, v in values.items() if k not in ("resume", "config")}
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(unknown)}")
    typed = {k: _typed(k, v) for k, v in values.items()}
    if typed.get("loss_options") is None:
        typed["loss_options"] = {}
    return validate(TrainConfig(**typed))


#: options added after runs were saved, with the value that a run saved without them used (the emoji
#: benchmark had Google's and Twitter's renderings only before ``emoji_artists``; the trunk learned at
#: the base rate before ``trunk_lr_mult``)
SAVED_RUN_DEFAULTS: dict[str, Any] = {"emoji_artists": "google,twitter", "trunk_lr_mult": 1.0}


def saved_run_config(values: dict[str, Any]) -> TrainConfig:
    """The configuration of a saved run (its ``config.json`` or checkpoint), as `config_from_dict`, with
    the options it predates set to what it used (`SAVED_RUN_DEFAULTS`), not to today's defaults.

    Args:
        values: the saved ``{field name: value}``.

    Returns:
        The `TrainConfig`.

    Raises:
        ConfigError: as `config_from_dict`.
    """
    defaults = dict(SAVED_RUN_DEFAULTS)
    if values.get("dataset", "emoji") != "emoji":
        del defaults["emoji_artists"]
    return config_from_dict({**defaults, **values})


def config_changes(old: dict[str, Any], new: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """The options whose values differ between two configuration dicts, as ``"name: old → new"``.

    Args:
        old: a configuration dict (e.g. the one in ``last.pt``).
        new: another (e.g. ``config.json`` as it is now).
        ignore: option names not compared.

    Returns:
        One entry per differing option, in field order (empty when they agree).
    """
    return [f"{name}: {old.get(name)!r} → {new.get(name)!r}" for name in _FIELDS
            if name not in ignore and old.get(name) != new.get(name)]
