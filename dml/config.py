"""Every hyperparameter of a training run, from defaults, a config file (TOML, YAML or JSON) and flags.

Precedence: command-line flags > ``--config`` file > the defaults below. The effective configuration
is written to ``OUTPUT/config.json`` (itself a valid ``--config`` file).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config file or value that cannot be used (one-line message)."""


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    """Hyperparameters of ``python -m dml.train`` (flags use dashes: ``embed_dim`` → ``--embed-dim``).

    Every field is also a command-line flag (`build_parser`) and a config-file key; the help text of
    the flags is the field's ``help`` metadata. Build one with `parse_config` or `config_from_dict`.

    Attributes:
        output_dir: run directory: config, checkpoints, logs, ``final_metrics.json``. Default ``"runs/demo"``.
        dataset: ``emoji``, ``folder``, ``cub200``, ``cars196`` or ``sop``. Default ``"emoji"``.
        data_root: dataset location (emoji: found automatically after setup). Default None.
        val_fraction: fraction of the training classes held out for model selection. Default 0.2.
        split_seed: seed of the class split (kept fixed across training seeds). Default 0.
        backbone: ``efficientnet_lite0``, ``resnet50`` or ``tiny``. Default ``"efficientnet_lite0"``.
        weights: backbone weights: ``"default"`` (packaged Lite0 ImageNet weights), a path, or ``"none"``.
            Default ``"default"``.
        embed_dim: embedding dimension $p$. Default 128.
        pooling: ``avg``, ``max`` or ``avgmax``. Default ``"avg"``.
        freeze_batchnorm: keep BatchNorm statistics frozen (as in the paper). Default True.
        trunk: ``finetune``, ``frozen`` or ``auto`` (frozen with cached features on CPU, finetune on GPU).
            Default ``"auto"``.
        feature_views: frozen trunk: views per training image whose features are cached (1: the centre
            crop only; more add random-resized-crop + flip views). Default 1.
        amp: mixed precision of the network: ``auto`` (bf16 on CUDA, off on CPU), ``bf16`` or ``off``; the
            embedding head and the vMF parts of the losses run in float32/float64 regardless. Default
            ``"auto"``.
        channels_last: channels-last memory format: ``auto`` (on CUDA), ``on`` or ``off``. Default ``"auto"``.
        device_augment: fine-tuning with the images on the device (`dml.pipeline.DeviceImagePipeline`):
            ``auto`` (on CUDA when they fit), ``on`` or ``off``. Default ``"auto"``.
        compile: ``torch.compile`` the trunk's forward. Default False.
        feature_cache: frozen trunk: a directory where the trunk features are saved and reused across runs
            (keyed by the image paths, backbone, weights, pooling, resolution, views). Default None.
        resolution: input crop size (0: the backbone's own, 224 for Lite0 / ResNet-50). Default 0.
        loss: a name of `dml.losses.LOSSES` (``el_nivmf``, ``el_nivmf_paper``, ``el_vmf``, ``ppk_vmf``,
            ``kl_vmf``, ``proxy_anchor``, ``proxy_nca``, ``norm_softmax``, ``l2``, ``cosine``).
            Default ``"el_nivmf"``.
        loss_options: the loss's keyword options (`dml.losses.loss_options`), e.g. from
            ``--loss-option guidance_weight=1.0``. Default: none (``{}`` after parsing).
        init_norm: initial mean embedding norm κ, set by a fixed head output scale (0: the loss's
            default, 2.5 × ``embed_dim`` for the vMF losses). Default 0.
        epochs: training epochs (0: a default that fits the device: 40 frozen, 30 fine-tuning). Default 0.
        batch_size: images per batch — the global batch under torchrun, split over the processes. Default 112.
        samples_per_class: images of one class per batch group ($m$). Default 2.
        optimizer: ``adamw`` or ``adam``. Default ``"adamw"``.
        lr: base learning rate (0: 1e-4); the head gets ``head_lr_mult`` ×, the loss's groups their own
            multipliers. Default 0.
        head_lr_mult: learning-rate multiplier of the embedding head. Default 10.
        weight_decay: AdamW weight decay of the network (loss parameters get none). Default 1e-4.
        scheduler: ``cosine`` or ``constant`` (per step, after warm-up). Default ``"cosine"``.
        warmup_epochs: linear warm-up length in epochs. Default 1.
        grad_clip: clip the gradient norm of the network (0: off). Default 10.
        seed: seed of initialisation, sampling and augmentation. Default 0.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``. Default ``"auto"``.
        eval_batch_size: images per batch when embedding for evaluation. Default 256.
        log_every: steps between loss logs (one host sync each). Default 50.
        degradation_images: test images in the degradation test of κ (vMF losses; 0: 64 on CPU, 256 on
            GPU). Default 0.
        selection_metric: validation metric that selects the checkpoint (`dml.train.SELECTION_METRICS`).
            Default ``"recall@1"``.
        resume: continue the run in this directory exactly where it stopped. Default None.
        config: TOML / YAML / JSON file with any of these keys. Default None.
    """

    output_dir: str = _opt("runs/demo", "run directory: config, checkpoints, logs, final_metrics.json")
    dataset: str = _opt("emoji", "emoji | folder | cub200 | cars196 | sop")
    data_root: str | None = _opt(None, "dataset location (emoji: found automatically after setup)")
    val_fraction: float = _opt(0.2, "fraction of the training classes held out for model selection")
    split_seed: int = _opt(0, "seed of the class split (kept fixed across training seeds)")
    backbone: str = _opt("efficientnet_lite0", "efficientnet_lite0 | resnet50 | tiny")
    weights: str = _opt("default", "backbone weights: 'default' (packaged Lite0 ImageNet weights), a path, or 'none'")
    embed_dim: int = _opt(128, "embedding dimension p")
    pooling: str = _opt("avg", "avg | max | avgmax")
    freeze_batchnorm: bool = _opt(True, "keep BatchNorm statistics frozen (as in the paper)")
    trunk: str = _opt("auto", "finetune | frozen | auto (frozen with cached features on CPU, finetune on GPU)")
    feature_views: int = _opt(1, "frozen trunk: views per training image whose features are cached (1: the centre "
                              "crop only; more add random-resized-crop + flip views)")
    amp: str = _opt("auto", "mixed precision of the network: auto (bf16 on CUDA, off on CPU) | bf16 | off")
    channels_last: str = _opt("auto", "channels-last memory format for the network: auto (on CUDA) | on | off")
    device_augment: str = _opt("auto", "fine-tuning: images as uint8 on the device, crops by grid_sample: auto (on "
                                       "CUDA when they fit in 40% of free memory) | on | off")
    compile: bool = _opt(False, "torch.compile the trunk's forward")
    feature_cache: str | None = _opt(None, "frozen trunk: directory where cached trunk features are kept and reused "
                                           "across runs (keyed by data, backbone, weights, resolution, views)")
    resolution: int = _opt(0, "input crop size (0: the backbone's own, 224 for Lite0 / ResNet-50)")
    loss: str = _opt("el_nivmf", "el_nivmf | el_nivmf_paper | el_vmf | ppk_vmf | kl_vmf | proxy_anchor | proxy_nca | "
                                 "norm_softmax | l2 | cosine")
    loss_options: dict[str, Any] = _opt(None, "loss keyword options, e.g. --loss-option guidance_weight=1.0",
                                         flag="--loss-option")
    init_norm: float = _opt(0.0, "initial mean embedding norm κ, set by a fixed head output scale (0: the loss's default, 2.5 × embed_dim for the vMF losses)")
    epochs: int = _opt(0, "training epochs (0: a default that fits the device: 40 frozen, 30 fine-tuning)")
    batch_size: int = _opt(112, "images per batch (the global batch under torchrun, split over the processes)")
    samples_per_class: int = _opt(2, "images of one class per batch group (m)")
    optimizer: str = _opt("adamw", "adamw | adam")
    lr: float = _opt(0.0, "base learning rate (0: 1e-4); the head gets head_lr_mult ×, the loss's groups their own multipliers")
    head_lr_mult: float = _opt(10.0, "learning-rate multiplier of the embedding head")
    weight_decay: float = _opt(1e-4, "AdamW weight decay of the network (loss parameters get none)")
    scheduler: str = _opt("cosine", "cosine | constant (per step, after warmup)")
    warmup_epochs: float = _opt(1.0, "linear warm-up length in epochs")
    grad_clip: float = _opt(10.0, "clip the gradient norm of the network (0: off)")
    seed: int = _opt(0, "seed of initialisation, sampling and augmentation")
    device: str = _opt("auto", "auto | cpu | cuda | cuda:N")
    eval_batch_size: int = _opt(256, "images per batch when embedding for evaluation")
    log_every: int = _opt(50, "steps between loss logs (one host sync each)")
    degradation_images: int = _opt(0, "test images in the degradation test of κ (vMF losses; 0: 64 on CPU, 256 on GPU)")
    selection_metric: str = _opt("recall@1", "validation metric that selects the checkpoint")
    resume: str | None = _opt(None, "continue the run in this directory exactly where it stopped")
    config: str | None = _opt(None, "TOML / YAML / JSON file with any of these keys")

    def to_dict(self) -> dict[str, Any]:
        """The configuration as a plain dict (what ``config.json`` holds; `config_from_dict` reads it back).

        Returns:
            ``{field name: value}`` for every field.
        """
        return dataclasses.asdict(self)


_BOOLEAN_WORDS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


def _parse_value(text: str) -> Any:
    """A ``--loss-option`` value: JSON if it parses (numbers, booleans, lists), else the string."""
    try:
        return json.loads(text)  # numbers first: guidance_weight=0 is the number 0, not False
    except json.JSONDecodeError:
        pass
    lowered = text.lower()
    if lowered in _BOOLEAN_WORDS:
        return _BOOLEAN_WORDS[lowered]
    return text


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Keys and values of a TOML, YAML or JSON file (by extension).

    Args:
        path: a ``.toml``, ``.yaml`` / ``.yml`` or ``.json`` file holding one table; keys may use
            dashes or underscores.

    Returns:
        ``{field name: value}`` with dashes in the keys replaced by underscores (values not yet coerced).

    Raises:
        ConfigError: missing or unparsable file, another extension, a file that is not a table, or an
            unknown key.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"config file {path}: use a .toml, .yaml, .yml or .json file")
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - any parser error becomes one line
        raise ConfigError(f"cannot parse config file {path}: {err}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table of keys")
    data = {k.replace("-", "_"): v for k, v in data.items()}
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"config file {path}: unknown key(s) {', '.join(unknown)}")
    return data


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m dml.train`` argument parser (defaults suppressed so that file values can win).

    Returns:
        An `argparse.ArgumentParser` with one flag per `TrainConfig` field (booleans as
        ``--x`` / ``--no-x``, ``--loss-option KEY=VALUE`` repeatable); parsed namespaces contain only
        the flags given.
    """
    parser = argparse.ArgumentParser(
        prog="python -m dml.train",
        description="Train an image-retrieval embedding with a proxy-based (probabilistic) metric-learning loss "
        "and evaluate it on classes never seen in training.",
        argument_default=argparse.SUPPRESS,
    )
    for f in dataclasses.fields(TrainConfig):
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        help_text = f"{f.metadata['help']} (default: {f.default})"
        if f.name == "loss_options":
            parser.add_argument(flag, dest=f.name, action="append", metavar="KEY=VALUE", help=help_text)
        elif f.type in ("bool", bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            parser.add_argument(flag, dest=f.name, type=kind, help=help_text)
    return parser


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Defaults, then ``--config`` file values, then flags.

    ``--loss-option`` values are parsed as JSON where possible (numbers, booleans, lists), else as
    booleans (``true``/``yes``/``on``…) or strings, and update the file's ``loss_options``.

    Args:
        argv: the command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The effective `TrainConfig`.

    Raises:
        ConfigError: bad file, unknown key, malformed ``--loss-option``, a value of the wrong type, or
            ``--resume`` combined with other flags.
        SystemExit: from `argparse` on an unknown flag or ``--help``.
    """
    args = vars(build_parser().parse_args(sys.argv[1:] if argv is None else argv))
    if args.get("resume") and len(args) > 1:
        others = ", ".join("--" + k.replace("_", "-") for k in sorted(args) if k != "resume")
        raise ConfigError(f"--resume continues a run with its saved configuration; drop the other flags ({others})")
    values: dict[str, Any] = {}
    if args.get("config"):
        values.update(read_config_file(args["config"]))
    options = dict(values.get("loss_options") or {})
    for item in args.pop("loss_options", []) or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--loss-option expects KEY=VALUE, got {item!r}")
        options[key.strip().replace("-", "_")] = _parse_value(value.strip())
    values.update(args)
    values["loss_options"] = options
    return config_from_dict(values)


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """A `TrainConfig` from a dict (unknown keys rejected, types coerced).

    Args:
        values: ``{field name: value}``; values are coerced to the field's type (int, float, bool
            from words such as ``"yes"``, str); missing fields keep their defaults.

    Returns:
        The `TrainConfig` (``loss_options`` is ``{}`` when not given).

    Raises:
        ConfigError: on an unknown key or a value that cannot be coerced.
    """
    known = {f.name: f for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(unknown)}")
    coerced = {}
    for key, value in values.items():
        kind = str(known[key].type)
        try:
            if value is None or key == "loss_options":
                coerced[key] = value
            elif kind == "int":
                coerced[key] = int(value)
            elif kind == "float":
                coerced[key] = float(value)
            elif kind == "bool":
                coerced[key] = value if isinstance(value, bool) else _BOOLEAN_WORDS[str(value).lower()]
            else:
                coerced[key] = str(value)
        except (ValueError, KeyError):
            raise ConfigError(f"config value {key}={value!r} is not a valid {kind}") from None
    config = TrainConfig(**coerced)
    if config.loss_options is None:
        config.loss_options = {}
    return config
