"""The job config's sections: one typed dataclass per component, and the choices their fields take.

Every component receives its section of one `JobConfig`; nothing reads `os.environ` except entry points.
Each section's `validate()` checks ranges with messages that say the fix (loading, config/load.py, checks
keys and types first). Only dataclasses and choices live here: no file is read.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from lipnext_scale.config import batch
from lipnext_scale.config.batch import BatchPlan
from lipnext_scale.config.errors import ConfigError
from lipnext_scale.eps import parse_eps_list

# Choices: one source each. Loading checks a value against its Literal and lists the choices on error;
# code that needs the list reads it with `choices(Type)`.
Retraction = Literal["fast_exp", "polar_ns"]
Moments = Literal["adam", "momentum"]
FastExpRule = Literal["rho", "frobenius"]  # optim/fast_exp.py
RotationDtype = Literal["float32", "float64"]
EuclidOptimizer = Literal["adamw", "nadam"]
Dataset = Literal["digits", "cifar10", "cifar100", "tiny-imagenet", "imagenet"]
LossKind = Literal["emma", "margin"]
Attack = Literal["", "pgd", "fmn"]
Precision = Literal["bf16", "fp32"]
ShiftMode = Literal["circular", "zero"]
CheckpointUpload = Literal["async", "sync"]


def choices(literal: Any) -> tuple[str, ...]:
    return typing.get_args(literal)


def check_choices(section: Any, where: str) -> None:
    """Every Literal-typed field of a section holds one of its choices (also for sections built in code)."""
    for name, tp in typing.get_type_hints(type(section)).items():
        value = getattr(section, name)
        literals = [t for t in (tp, *typing.get_args(tp)) if typing.get_origin(t) is Literal]
        if literals and value is not None and value not in choices(literals[0]):
            shown = ", ".join(repr(a) if a == "" else str(a) for a in choices(literals[0]))
            raise ConfigError(f"{where}.{name}={value!r}: choose one of {shown}")


@dataclass(frozen=True)
class Architecture:
    """A LipNeXt's shape: the fields of a registry entry (model/lipnext.py's ModelSpec extends this class) and,
    each one, an optional `model.<field>` override of the job config (`ModelConfig`). Declared here, below the
    model, because loading checks model keys before any model code is imported: a new knob is one field here."""
    width: int
    depth: int
    patch_size: int
    image_size: int
    num_classes: int
    beta: float = 0.5  # share of channels under |x| in beta-Abs (paper: default not stated; LiResNet's 0.5)
    shift_alpha: float = 0.125  # share of channels shifted per direction (paper: 1/8 or 1/16 best)
    shift_mode: ShiftMode = "circular"  # paper: circular + positional encoding beats zero padding
    positional: bool = True  # the learnable positional encoding p of each block


def _architecture_overrides(cls: type) -> type:
    """Adds to a section (before @dataclass) each `Architecture` field it does not declare, as an optional
    override `name: T | None = None` (None keeps the registry entry's value); `cls.OVERRIDES` lists them."""
    cls.OVERRIDES = tuple(f.name for f in dataclasses.fields(Architecture) if f.name not in cls.__annotations__)
    for f in dataclasses.fields(Architecture):
        if f.name in cls.OVERRIDES:
            cls.__annotations__[f.name] = f"{f.type} | None"  # a string: this module defers annotations
            setattr(cls, f.name, None)
    return cls


@dataclass
@_architecture_overrides
class ModelConfig:
    name: str = "lipnext-tiny"
    num_classes: int = 10
    image_size: int = 32
    # Then every other `Architecture` field (width, depth, patch_size, beta, shift_alpha, shift_mode,
    # positional, ...) as an override of the registry entry; None keeps its value.
    OVERRIDES: ClassVar[tuple[str, ...]] = ()

    def validate(self) -> None:
        check_choices(self, "model")
        if self.num_classes < 2:
            raise ConfigError(f"model.num_classes={self.num_classes}: need at least 2 classes")
        if self.image_size < 1:
            raise ConfigError(f"model.image_size={self.image_size}: must be a positive pixel count")

    def overrides(self) -> dict[str, Any]:
        """The architecture overrides that are set, as keyword arguments of `create_model`."""
        return {k: getattr(self, k) for k in self.OVERRIDES if getattr(self, k) is not None}


@dataclass
class OptimConfig:
    # Orthogonal matrices (paper.md A "Optimizer", B.5): moments of the Euclidean gradient turned into a skew
    # generator A, X <- X FastExp(A) (tall: a low-rank left rotation), exact polar every `polar_every` steps,
    # Manifold Lookahead every `lookahead_k`. retraction = "polar_ns" with moments = "momentum" is the
    # pre-FastExp default (Riemannian heavy-ball + Newton-Schulz polar), kept for ablations.
    lr: float = 0.002
    retraction: Retraction = "fast_exp"
    moments: Moments = "adam"  # polar_ns needs momentum
    momentum: float = 0.9  # heavy-ball coefficient (moments = "momentum")
    # Adam-type moments of the manifold gradients: (0.9, 0.999) as the first author's orthogonal ViT code and
    # LiResNet++'s NAdam (was 0.99 here, ours)
    manifold_betas: tuple[float, float] = (0.9, 0.999)
    manifold_eps: float = 1e-8
    polar_every: int = 500  # exact fp64 polar every N steps (about one epoch); 0: never
    # fast_exp: one Newton-Schulz step every polish_every updates (0: never), so truncation and rounding
    # errors never accumulate; rotation_dtype: the arithmetic of X FastExp(A), rounded back to the fp32 master.
    polish_every: int = 1
    rotation_dtype: RotationDtype = "float32"
    # Per-matrix normalised step (ablation; the first author's later LLM code): ||A||_F = lr sqrt(p) whatever
    # the gradient's scale, so FastExp's branch no longer grows with width through Adam's normalisation.
    normalize_step: bool = False
    # FastExp's Taylor order per matrix (optim/fast_exp.py): "rho" bounds the remainder with sqrt(||A^2||_F)
    # (<= ||A||_F, same error targets), "frobenius" is the paper's ||A||_F thresholds. Beyond order 4: scaled
    # Taylor with up to fast_exp_squarings squarings (each one batched matmul per update); a matrix needing
    # more takes a shortened step (counted as "clipped" in TensorBoard's fast_exp/ scalars).
    fast_exp_rule: FastExpRule = "rho"
    fast_exp_squarings: int = 3
    # Manifold Lookahead every k steps (slow <- slow FastExp(1/2 sum of the k updates)); 0: off. 6: timm's
    # Lookahead default, which LiResNet++ (the paper's recipe) uses (was 5 here, ours)
    lookahead_k: int = 6
    ns_iters: int = 6  # polar_ns only
    # Everything else: NAdam or AdamW, with plain Lookahead (alpha 1/2) every euclid_lookahead_k steps if > 0.
    euclid_optimizer: EuclidOptimizer = "adamw"
    euclid_lr: float = 1e-3
    euclid_lookahead_k: int = 0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    # The schedule length. Not a config key: `JobConfig.derive` sets it from train.steps (one source); set it
    # directly only when using the optimizer on its own (tests, benches).
    total_steps: int = 1000
    min_lr_ratio: float = 0.0
    # > 0: each group is clipped by its own global grad norm (manifold: the optimizer; Euclidean: the
    # optimizer in one process, DeepSpeed's gradient_clipping under ZeRO-3). 0: no clipping.
    grad_clip: float = 0.0
    # ZeRO-3 manifold step: fp32 MiB of matrices an owner gathers per round (at least one matrix), which
    # bounds the memory it holds beyond its shard; larger = fewer collectives.
    manifold_bucket_mb: float = 256.0

    def validate(self) -> None:
        check_choices(self, "optim")
        if self.retraction == "polar_ns" and self.moments != "momentum":
            raise ConfigError('optim.moments="adam" needs optim.retraction="fast_exp"; polar_ns is the '
                              'heavy-ball ablation: set optim.moments="momentum"')
        if self.ns_iters < 1:
            raise ConfigError(f"optim.ns_iters={self.ns_iters}: must be >= 1")
        if not 0 <= self.fast_exp_squarings <= 8:
            raise ConfigError(f"optim.fast_exp_squarings={self.fast_exp_squarings}: must be in 0..8 (each costs one "
                              "matmul per update; 3 covers steps 8x past Taylor order 4)")
        for key in ("polar_every", "lookahead_k", "euclid_lookahead_k", "polish_every"):
            if getattr(self, key) < 0:
                raise ConfigError(f"optim.{key}={getattr(self, key)}: must be >= 0 (0 disables it)")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay={self.weight_decay}: must be >= 0")
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
                f"optim.warmup_steps={self.warmup_steps} with a run of train.steps={self.total_steps}: need "
                "0 <= warmup_steps <= train.steps; lower optim.warmup_steps or raise train.steps"
            )


@dataclass
class DataConfig:
    # A shard pattern ("{train-000000..000009}.tar" brace syntax) or a manifest URL; any fsspec URL.
    train_url: str = ""
    eval_url: str = ""
    dataset: Dataset = "digits"  # picks the augmentation
    batch_size: int = 64  # per training rank: the largest micro-batch (the split at a world size: JobConfig.batch_plan)
    loader_processes: int = 2  # DataLoader processes per training rank
    shuffle_buffer: int = 1000
    seed: int = 0

    def validate(self) -> None:
        check_choices(self, "data")
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size={self.batch_size}: must be >= 1")
        if self.loader_processes < 0:
            raise ConfigError(f"data.loader_processes={self.loader_processes}: must be >= 0")
        if self.shuffle_buffer < 0:
            raise ConfigError(f"data.shuffle_buffer={self.shuffle_buffer}: must be >= 0")


@dataclass
class LossConfig:
    # Certified-training loss (paper.md B.6; lipnext_scale/train/loss.py). "emma": the paper's (LiResNet++'s
    # EMMA); "margin": our earlier fixed-offset margin loss (offset, temperature apply to it only).
    kind: LossKind = "emma"
    eps: float = 36 / 255  # the radius training aims at (usually the first certify eps)
    # The training eps ramps linearly from eps_ramp_start * eps at step 0 to eps_ramp_end * eps at
    # eps_ramp_fraction of train.steps, then stays (LiResNet++: 0.1 -> 3.0 over the first half).
    eps_ramp_start: float = 0.1
    eps_ramp_end: float = 3.0
    eps_ramp_fraction: float = 0.5
    offset: float = 1.0
    temperature: float = 0.25

    def validate(self) -> None:
        check_choices(self, "loss")
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
    actors: int = 2  # Ray actors, one model copy each; 0 runs in the calling process
    attack: Attack = ""  # an attack on certified points, a soundness check (fmn: Foolbox extra); "": none
    attack_steps: int = 10
    # While training runs (lipnext_scale/certify/during_training.py): every checkpoint is certified by this same job
    # in a Ray task of its own, on its own resources; training never waits for it.
    during_training: bool = True  # needs certify.data_url or data.eval_url
    data_url: str = ""  # held-out shards certified during training (e.g. a few shards); "": data.eval_url
    # Per certifying process (each actor; with actors = 0 the task itself): {CPU = n} or {GPU = 1} (a GPU of
    # its own, plus 1 CPU unless CPU is given). The task that drives the actors takes no CPU of its own.
    resources: dict[str, float] = field(default_factory=lambda: {"CPU": 1})
    # One checkpoint's certification, from its launch (start-up and retries included); then it is cancelled
    # (logged; training goes on).
    timeout_s: float = 3600.0
    retries: int = 1  # a certification that failed runs again this many times (logged each time)
    # Checkpoints waiting for certification (Ray Train runs one at a time) kept at most: when certifying takes
    # longer than ckpt.every_steps, older waiting ones are skipped (logged) and pruned, so the disk holds a
    # bounded backlog and certification keeps up with the newest. 0: certify every checkpoint, keep them all.
    max_waiting: int = 2
    # After the last step the run waits for the certifications still queued; those not started within this
    # many seconds are skipped (logged), except the final checkpoint's, which always runs (under timeout_s).
    final_wait_s: float = 600.0

    def radii(self) -> list[float]:
        """certify.eps as radii, in the order given (the one place they are parsed: every component that
        certifies, estimates or serves reads them here); raises ConfigError naming the value and the problem."""
        try:
            return parse_eps_list(self.eps)
        except ValueError as e:
            raise ConfigError(f"certify.eps={self.eps!r}: {e}") from None

    def validate(self) -> None:
        check_choices(self, "certify")
        self.radii()
        if self.lipschitz_tol < 0:
            raise ConfigError(f"certify.lipschitz_tol={self.lipschitz_tol}: must be >= 0")
        if self.actors < 0 or self.batch_size < 1 or self.attack_steps < 1:
            raise ConfigError(f"certify.actors={self.actors}, certify.batch_size={self.batch_size}, "
                              f"certify.attack_steps={self.attack_steps}: need actors >= 0, the others >= 1")
        if not self.timeout_s > 0 or self.retries < 0 or self.final_wait_s < 0 or self.max_waiting < 0:
            raise ConfigError(f"certify.timeout_s={self.timeout_s}, certify.retries={self.retries}, "
                              f"certify.final_wait_s={self.final_wait_s}, certify.max_waiting={self.max_waiting}: "
                              "need timeout_s > 0 and retries, final_wait_s, max_waiting >= 0")
        self.cpus_and_gpus()

    def cpus_and_gpus(self) -> tuple[int, int]:
        """(CPUs, GPUs) of each certifying process from certify.resources; raises ConfigError."""
        how = "use {CPU = 2} (CPU threads) or {GPU = 1} (a GPU of its own), e.g. --set 'certify.resources={GPU=1}'"
        unknown = sorted(set(self.resources) - {"CPU", "GPU"})
        values = [self.resources.get(k, d) for k, d in (("CPU", 1), ("GPU", 0))]
        if unknown or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v == int(v) for v in values):
            raise ConfigError(f"certify.resources={self.resources!r}: {how}")
        cpus, gpus = (int(v) for v in values)
        if cpus < 1 or gpus not in (0, 1):
            raise ConfigError(f"certify.resources={self.resources!r}: need CPU >= 1 and GPU 0 or 1; {how}")
        return cpus, gpus


_RUN_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")


@dataclass
class TrainConfig:
    # One training run: where it writes (checkpoints, TensorBoard, resolved config) and how it runs.
    name: str = "run"
    storage: str = "./runs"  # fsspec URL (local path, file://, s3://, gs://); the run lives in {storage}/{name}
    steps: int = 1000  # optimizer steps (each = the BatchPlan's accumulation micro-batches per worker)
    grad_accum: int = 1  # with global_batch 0: the accumulation at the most workers (sets the default global batch)
    precision: Precision = "bf16"  # fp32 gives bit-exact resume checks
    # Ray Train workers = data-parallel ranks. A range ("2-4" or [2, 4]) is elastic: Ray Train starts with as
    # many as the cluster holds (at least the minimum), restarts at the size left when a node goes and grows
    # back when nodes return; each (re)start resumes from the newest checkpoint.
    num_workers: int | str | list[int] = 2
    # Images per optimizer step over all workers, the same at every world size (the schedule counts steps).
    # 0: data.batch_size x grad_accum x the most workers. At W workers each takes global_batch / W images per
    # step, as micro-batches of at most data.batch_size (`JobConfig.batch_plan`); it must divide by every allowed W.
    global_batch: int = 0
    resize_check_s: float = 60.0  # elastic runs: how often Ray Train re-counts the workers it could run
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
        check_choices(self, "train")
        if not _RUN_NAME.fullmatch(self.name) or set(self.name) == {"."}:
            raise ConfigError(f"train.name={self.name!r}: use letters, digits, '.', '_' and '-' only "
                              "(it names a directory under train.storage), e.g. train.name=cifar10-run1")
        if not self.storage:
            raise ConfigError("train.storage is empty: set a directory or URL, e.g. --set train.storage=./runs")
        for key in ("steps", "grad_accum", "cpus_per_worker", "log_every", "eval_batches"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}={getattr(self, key)}: must be >= 1")
        _ = self.worker_range  # parses train.num_workers (raises ConfigError)
        if self.global_batch < 0 or self.resize_check_s <= 0:
            raise ConfigError(f"train.global_batch={self.global_batch}, train.resize_check_s={self.resize_check_s}: "
                              "need global_batch >= 0 (0: data.batch_size x grad_accum x the most workers) and "
                              "resize_check_s > 0")
        if self.global_batch:
            self.check_global_batch(1)
        if self.eval_every < 0 or self.max_failures < 0:
            raise ConfigError("train.eval_every and train.max_failures must be >= 0")
        if self.use_gpu not in ("auto", True, False):
            raise ConfigError(f"train.use_gpu={self.use_gpu!r}: choose \"auto\", true or false")
        if not self.resume:
            raise ConfigError("train.resume is empty: use \"auto\", \"none\" or a checkpoint path")

    @property
    def worker_range(self) -> tuple[int, int]:
        """(fewest, most) workers: (n, n) for a fixed count, else the elastic range of train.num_workers."""
        return batch.worker_range(self.num_workers)

    @property
    def elastic(self) -> bool:
        return self.worker_range[0] < self.worker_range[1]

    def global_batch_for(self, max_micro_batch: int) -> int:
        """train.global_batch, or its default: data.batch_size (`max_micro_batch`) x grad_accum x most workers."""
        return batch.global_batch_for(self, max_micro_batch)

    def check_global_batch(self, max_micro_batch: int, world: int | None = None) -> int:
        """The global batch, checked to split evenly over every allowed world size (and `world`, if given);
        raises ConfigError naming the fix."""
        return batch.check_global_batch(self, max_micro_batch, world)

    def batch_plan(self, world: int, max_micro_batch: int) -> BatchPlan:
        """(micro, accumulation, global batch) at `world` workers (config/batch.py); raises ConfigError."""
        return batch.plan_batch(self, world, max_micro_batch)

    def batch_split(self, world: int, max_micro_batch: int) -> tuple[int, int]:
        """(micro-batch per worker, accumulation steps) at `world` workers: the global batch stays what the
        config says; the micro-batch is the largest divisor of the worker's share within data.batch_size
        (`max_micro_batch`), which makes the fewest accumulation steps. Raises ConfigError."""
        plan = self.batch_plan(world, max_micro_batch)
        return plan.micro, plan.accumulation


@dataclass
class CheckpointConfig:
    every_steps: int = 100  # also written at the end of the run and on SIGTERM
    # Retention (lipnext_scale/ckpt/manager.py): the newest keep_last complete checkpoints (resume points),
    # plus the keep_best certified best by best_metric; one still being certified or uploaded is never deleted.
    keep_last: int = 3
    keep_best: int = 2  # needs certify.during_training; 0: by age only
    best_metric: str = "cra@36/255"  # "clean" (clean accuracy) or "cra@<eps>" (one of certify.eps)
    # async: the step goes on while Ray Train uploads the checkpoint (only writing it to local disk stalls it);
    # sync: the step waits for the upload.
    upload: CheckpointUpload = "async"

    def validate(self) -> None:
        check_choices(self, "ckpt")
        if self.every_steps < 1 or self.keep_last < 1 or self.keep_best < 0:
            raise ConfigError(f"ckpt.every_steps={self.every_steps}, ckpt.keep_last={self.keep_last}, "
                              f"ckpt.keep_best={self.keep_best}: need every_steps, keep_last >= 1, keep_best >= 0")
        self.best_eps()

    def best_eps(self) -> float | None:
        """The radius of ckpt.best_metric ("cra@36/255" -> 36/255), None for "clean"; raises ConfigError."""
        kind, _, eps = self.best_metric.partition("@")
        if self.best_metric == "clean":
            return None
        if kind == "cra" and eps and "," not in eps:
            try:
                return parse_eps_list(eps)[0]
            except ValueError:
                pass
        raise ConfigError(f"ckpt.best_metric={self.best_metric!r}: use \"clean\" or \"cra@<eps>\" with one eps of "
                          "certify.eps, e.g. \"cra@36/255\"")


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    certify: CertifyConfig = field(default_factory=CertifyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ckpt: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self) -> None:
        self.derive()

    def derive(self) -> None:
        """The values derived from others, set in this one place: the schedule spans the run, so
        optim.total_steps (read by the lr schedule) is train.steps. Run again by `validate`, after a caller
        changed train.steps (the demo's --steps)."""
        self.optim.total_steps = self.train.steps

    def batch_plan(self, world: int) -> BatchPlan:
        """How a step is batched at `world` workers (config/batch.py): the global batch is the config's at every
        size, split into micro-batches of at most data.batch_size; data.batch_size itself is never rewritten.
        Raises ConfigError."""
        return self.train.batch_plan(world, self.data.batch_size)

    def validate(self) -> None:
        self.derive()
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate()

