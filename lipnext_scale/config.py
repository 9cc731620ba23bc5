"""One typed job config: dataclasses, loaded from TOML files under `configs/`, with `--set a.b=value`.

Every component receives its section of one `JobConfig`; nothing reads `os.environ` except entry points.
Loading validates early: unknown keys are rejected with the list of valid ones, values are checked
against the field types, and each section's `validate()` checks ranges with messages that say the fix.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A config file, key or value is wrong; the message names it and the fix."""


@dataclass
class ModelConfig:
    name: str = "lipnext-tiny"
    num_classes: int = 10
    image_size: int = 32
    # Architecture overrides of the registry entry (lipnext_scale.model.ModelSpec); None keeps its value.
    width: int | None = None
    depth: int | None = None
    patch_size: int | None = None
    beta: float | None = None
    shift_alpha: float | None = None
    shift_mode: str | None = None
    positional: bool | None = None

    def validate(self) -> None:
        if self.num_classes < 2:
            raise ConfigError(f"model.num_classes={self.num_classes}: need at least 2 classes")
        if self.image_size < 1:
            raise ConfigError(f"model.image_size={self.image_size}: must be a positive pixel count")

    def overrides(self) -> dict[str, Any]:
        keys = ("width", "depth", "patch_size", "beta", "shift_alpha", "shift_mode", "positional")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


@dataclass
class OptimConfig:
    # Orthogonal matrices (paper.md A "Optimizer", B.5): moments of the Euclidean gradient turned into a skew
    # generator A, X <- X FastExp(A) (tall: a low-rank left rotation), exact polar every `polar_every` steps,
    # Manifold Lookahead every `lookahead_k`. retraction = "polar_ns" with moments = "momentum" is the
    # pre-FastExp default (Riemannian heavy-ball + Newton-Schulz polar), kept for ablations.
    lr: float = 0.002
    retraction: str = "fast_exp"  # fast_exp | polar_ns
    moments: str = "adam"  # adam | momentum (fast_exp); polar_ns needs momentum
    momentum: float = 0.9  # heavy-ball coefficient (moments = "momentum")
    manifold_betas: tuple[float, float] = (0.9, 0.99)  # Adam-type moments of the manifold gradients
    manifold_eps: float = 1e-8
    polar_every: int = 500  # exact fp64 polar every N steps (about one epoch); 0: never
    polish: bool = True  # fast_exp: one Newton-Schulz step per update, so truncation/rounding never accumulate
    lookahead_k: int = 5  # Manifold Lookahead every k steps (slow <- slow FastExp(1/2 sum of the k updates)); 0: off
    ns_iters: int = 6  # polar_ns only
    # Everything else: NAdam or AdamW, with plain Lookahead (alpha 1/2) every euclid_lookahead_k steps if > 0.
    euclid_optimizer: str = "adamw"  # adamw | nadam
    euclid_lr: float = 1e-3
    euclid_lookahead_k: int = 0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    total_steps: int = 1000
    min_lr_ratio: float = 0.0
    # > 0: each group is clipped by its own global grad norm (manifold: the optimizer; Euclidean: the
    # optimizer in one process, DeepSpeed's gradient_clipping under ZeRO-3). 0: no clipping.
    grad_clip: float = 0.0
    # ZeRO-3 manifold step: fp32 MiB of matrices an owner gathers per round (at least one matrix), which
    # bounds the memory it holds beyond its shard; larger = fewer collectives.
    manifold_bucket_mb: float = 256.0

    def validate(self) -> None:
        choices = {"retraction": ("fast_exp", "polar_ns"), "moments": ("adam", "momentum"),
                   "euclid_optimizer": ("adamw", "nadam")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"optim.{key}={getattr(self, key)!r}: choose one of {', '.join(allowed)}")
        if self.retraction == "polar_ns" and self.moments != "momentum":
            raise ConfigError('optim.moments="adam" needs optim.retraction="fast_exp"; polar_ns is the '
                              'heavy-ball ablation: set optim.moments="momentum"')
        if self.ns_iters < 1:
            raise ConfigError(f"optim.ns_iters={self.ns_iters}: must be >= 1")
        for key in ("polar_every", "lookahead_k", "euclid_lookahead_k"):
            if getattr(self, key) < 0:
                raise ConfigError(f"optim.{key}={getattr(self, key)}: must be >= 0 (0 disables it)")
        if self.grad_clip < 0 or self.manifold_bucket_mb <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optim.grad_clip={self.grad_clip}, optim.manifold_bucket_mb={self.manifold_bucket_mb}, "
                              f"optim.min_lr_ratio={self.min_lr_ratio}: need grad_clip >= 0, "
                              "manifold_bucket_mb > 0 and 0 <= min_lr_ratio <= 1")
        for name in ("lr", "euclid_lr", "manifold_eps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"optim.{name}={getattr(self, name)}: must be > 0")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"optim.momentum={self.momentum}: must be in [0, 1)")
        for key in ("manifold_betas", "betas"):
            if not all(0 <= b < 1 for b in getattr(self, key)):
                raise ConfigError(f"optim.{key}={getattr(self, key)}: both must be in [0, 1)")
        if self.total_steps < 1 or self.warmup_steps < 0 or self.warmup_steps > self.total_steps:
            raise ConfigError(
                f"optim.warmup_steps={self.warmup_steps}, optim.total_steps={self.total_steps}: "
                "need 0 <= warmup_steps <= total_steps and total_steps >= 1"
            )


@dataclass
class DataConfig:
    # A shard pattern ("{train-000000..000009}.tar" brace syntax) or a manifest URL; any fsspec URL.
    train_url: str = ""
    eval_url: str = ""
    dataset: str = "digits"  # digits | cifar10 | cifar100 | tiny-imagenet | imagenet: picks augmentation
    batch_size: int = 64
    num_workers: int = 2
    shuffle_buffer: int = 1000
    seed: int = 0

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size={self.batch_size}: must be >= 1")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers={self.num_workers}: must be >= 0")
        datasets = ("digits", "cifar10", "cifar100", "tiny-imagenet", "imagenet")  # = data.transforms.DATASETS
        if self.dataset not in datasets:
            raise ConfigError(f"data.dataset={self.dataset!r}: choose one of {', '.join(datasets)} "
                              "(it picks the augmentation)")


LOSS_KINDS = ("emma", "margin")


@dataclass
class LossConfig:
    # Certified-training loss (paper.md B.6; lipnext_scale/train/loss.py). "emma": the paper's (LiResNet++'s
    # EMMA); "margin": our earlier fixed-offset margin loss (offset, temperature apply to it only).
    kind: str = "emma"
    eps: float = 36 / 255  # the radius training aims at (usually the first certify eps)
    # The training eps ramps linearly from eps_ramp_start * eps at step 0 to eps_ramp_end * eps at
    # eps_ramp_fraction of train.steps, then stays (LiResNet++: 0.1 -> 3.0 over the first half).
    eps_ramp_start: float = 0.1
    eps_ramp_end: float = 3.0
    eps_ramp_fraction: float = 0.5
    offset: float = 1.0
    temperature: float = 0.25

    def validate(self) -> None:
        if self.kind not in LOSS_KINDS:
            raise ConfigError(f"loss.kind={self.kind!r}: choose one of {', '.join(LOSS_KINDS)}")
        if not self.temperature > 0:
            raise ConfigError(f"loss.temperature={self.temperature}: must be > 0")
        values = (self.eps, self.offset, self.eps_ramp_start, self.eps_ramp_end)
        if not all(0 <= v < float("inf") for v in values):
            raise ConfigError(f"loss.eps={self.eps}, loss.offset={self.offset}, loss.eps_ramp_start="
                              f"{self.eps_ramp_start}, loss.eps_ramp_end={self.eps_ramp_end}: all must be "
                              "finite and >= 0")
        if not 0 <= self.eps_ramp_fraction <= 1:
            raise ConfigError(f"loss.eps_ramp_fraction={self.eps_ramp_fraction}: must be in [0, 1] "
                              "(the share of train.steps over which eps ramps up)")


@dataclass
class CertifyConfig:
    eps: str = "36/255,72/255,108/255"
    batch_size: int = 256
    lipschitz_tol: float = 1e-4
    allow_approx: bool = False
    workers: int = 2  # Ray actors, one model copy each; 0 runs in the calling process
    attack: str = ""  # "" | "pgd" | "fmn": an attack on certified points, a soundness check (fmn: Foolbox extra)
    attack_steps: int = 10

    def validate(self) -> None:
        from lipnext_scale.certify.certify import parse_eps_list

        parse_eps_list(self.eps)
        if self.lipschitz_tol < 0:
            raise ConfigError(f"certify.lipschitz_tol={self.lipschitz_tol}: must be >= 0")
        if self.workers < 0 or self.batch_size < 1 or self.attack_steps < 1:
            raise ConfigError(f"certify.workers={self.workers}, certify.batch_size={self.batch_size}, "
                              f"certify.attack_steps={self.attack_steps}: need workers >= 0, the others >= 1")
        if self.attack not in ("", "pgd", "fmn"):
            raise ConfigError(f"certify.attack={self.attack!r}: choose \"pgd\", \"fmn\" or \"\" (no attack)")


@dataclass
class TrainConfig:
    # One training run: where it writes (checkpoints, TensorBoard, resolved config) and how it runs.
    name: str = "run"
    storage: str = "./runs"  # fsspec URL (local path, file://, s3://, gs://); the run lives in {storage}/{name}
    steps: int = 1000  # optimizer steps (each = grad_accum micro-batches per worker)
    grad_accum: int = 1
    precision: str = "bf16"  # bf16 | fp32 (fp32 gives bit-exact resume checks)
    num_workers: int = 2  # Ray Train workers = data-parallel ranks
    cpus_per_worker: int = 1
    use_gpu: bool | str = "auto"  # "auto" uses GPUs when the Ray cluster has them
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end
    eval_batches: int = 4  # held-out batches per worker per evaluation
    seed: int = 0
    deterministic_data: bool = False  # fixed data order: exact resume (tests, debugging), slower loading
    max_failures: int = 0  # Ray Train restarts from the last checkpoint this many times
    resume: str = "auto"  # auto (newest valid checkpoint of this run) | none | a checkpoint path/URL
    deepspeed: str = "configs/deepspeed/zero3_bf16.json"  # ZeRO settings; batch/precision/clip set from here
    progress_bar: bool = True

    def validate(self) -> None:
        if not self.name or "/" in self.name:
            raise ConfigError(f"train.name={self.name!r}: must be a non-empty name without '/'")
        if not self.storage:
            raise ConfigError("train.storage is empty: set a directory or URL, e.g. --set train.storage=./runs")
        for key in ("steps", "grad_accum", "num_workers", "cpus_per_worker", "log_every", "eval_batches"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}={getattr(self, key)}: must be >= 1")
        if self.eval_every < 0 or self.max_failures < 0:
            raise ConfigError("train.eval_every and train.max_failures must be >= 0")
        if self.precision not in ("bf16", "fp32"):
            raise ConfigError(f"train.precision={self.precision!r}: choose bf16 or fp32")
        if self.use_gpu not in ("auto", True, False):
            raise ConfigError(f"train.use_gpu={self.use_gpu!r}: choose \"auto\", true or false")
        if not self.resume:
            raise ConfigError("train.resume is empty: use \"auto\", \"none\" or a checkpoint path")


@dataclass
class CheckpointConfig:
    every_steps: int = 100  # also written at the end of the run and on SIGTERM
    keep_last: int = 3  # older complete checkpoints are deleted

    def validate(self) -> None:
        if self.every_steps < 1 or self.keep_last < 1:
            raise ConfigError(
                f"ckpt.every_steps={self.every_steps}, ckpt.keep_last={self.keep_last}: both must be >= 1"
            )


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    certify: CertifyConfig = field(default_factory=CertifyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ckpt: CheckpointConfig = field(default_factory=CheckpointConfig)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate()


# --------------------------------------------------------------------------------------------------
# Loading: TOML file -> nested dict -> dataclasses, then `--set` overrides, then validation.


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check (and minimally convert) `value` against the annotated type `tp`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}={value!r}: expected a list of {len(args)} values")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        (arg,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}={value!r}: expected a list")
        return [_coerce(v, arg, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}={value!r}: expected a number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}={value!r}: expected an integer")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}={value!r}: expected true or false")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}={value!r}: expected a string")
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}={value!r}: expected a table")
        return value
    raise ConfigError(f"{where}: unsupported field type {tp!r}")


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
            f"valid keys{' in [' + where + ']' if where else ''}: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        key = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"[{key}] must be a table, got {value!r}")
            kwargs[name] = _build(tp, value, key)
        else:
            kwargs[name] = _coerce(value, tp, key)
    return cls(**kwargs)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value); the value is read as a TOML value, else kept as a string."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set optim.lr=0.1")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: the key must be dotted names, e.g. model.width")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # a bare word such as lipnext-tiny or s3://bucket/x
    return key.split("."), value


def _nest(path: list[str], value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {path[-1]: value}
    for part in reversed(path[:-1]):
        out = {part: out}
    return out


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config; `extends = "other.toml"` (relative to this file) layers this one on top."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist; pass a path such as configs/train/demo.toml")
    try:
        data = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid TOML: {e}") from e
    parent = data.pop("extends", None)
    if parent is not None:
        data = _merge(read_toml(p.parent / parent), data)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                cls: type = JobConfig) -> Any:
    data: dict[str, Any] = read_toml(path) if path else {}
    for text in overrides:
        keys, value = parse_override(text)
        data = _merge(data, _nest(keys, value))
    cfg = _build(cls, data, "")
    cfg.validate()
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict[str, Any], cls: type = JobConfig) -> Any:
    """Inverse of `config_to_dict` (e.g. a config stored in a checkpoint), validated like a loaded file."""
    cfg = _build(cls, data, "")
    cfg.validate()
    return cfg
