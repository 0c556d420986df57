"""The training run's configuration: one typed dataclass, read from flags and YAML.

Flags mirror the reference code (``--arch --low-dim --nce-k --nce-t --nce-m --lr
--batch-size --epochs``; ``--nce-k 0`` means the exact softmax) plus the distributed ones
(README, *Training*). ``--config file.yaml`` supplies any of them (keys spelled like the flags,
with ``-`` or ``_``); flags given on the command line win over the file.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any

OBJECTIVES = ("auto", "nce", "softmax", "sampled-softmax", "parametric")
BANKS = ("store", "local")
ARCHS = ("auto", "small", "small-wide", "resnet18", "resnet50")
SCHEDULES = ("step", "cosine")
DECODE_MODES = ("auto", "cpu", "gpu")
CACHE_MODES = ("auto", "memory", "device", "off")
NCE_Z_MODES = ("fixed", "ema")
LAUNCHERS = ("ray", "local")
AUGMENTS = ("auto", "digits", "cifar", "imagenet")
PRECISIONS = ("auto", "bf16", "fp32")
BUILTIN = "digits"
#: ``--objective auto`` uses the exact softmax up to this many instances, the sampled
#: softmax (K noise rows) above. The exact softmax scores all N rows every step (0.044 s
#: for B = 256 at N = 50,000 on 2 CPU cores, 1.4 s at 1.28M; K = 4096 samples cost 0.09 s
#: whatever N). On CIFAR-10 (10 epochs, README "Which objective") the exact softmax
#: learned most, the sampled softmax nearly as much, NCE less, NCE with a fixed Z diverged.
SOFTMAX_AUTO_MAX_ROWS = 200_000


class ConfigError(ValueError):
    """An impossible or inconsistent setting; the CLI prints it on one line, exit 2."""


@dataclass
class TrainConfig:
    """Everything a run needs; saved with every checkpoint."""

    data: str = BUILTIN
    """Training shards: a directory or URL (s3://, gs://, http://, pipe:) with
    index.parquet, or the name of the built-in dataset."""
    val_data: str | None = None
    """Validation shards for kNN evaluation (default: the built-in test split, or none)."""
    output: str = "runs/npid"
    """Output directory: metrics.jsonl, checkpoints, snapshots, the exported encoder."""
    arch: str = "auto"
    """Encoder: small | small-wide | resnet18 | resnet50 | auto (small for the built-in
    dataset; otherwise resnet18 with --use-gpu, small-wide on a CPU)."""
    low_dim: int = 128
    objective: str = "auto"
    """auto | nce | softmax | sampled-softmax | parametric. auto: the exact softmax up to
    :data:`SOFTMAX_AUTO_MAX_ROWS` instances, the sampled softmax with K noise rows above
    (its step cost does not grow with N), chosen by the README's objective measurement;
    an explicit ``--nce-k`` other than the default asks for the paper's NCE. parametric:
    the paper's baseline, a learned N-way classifier over instance ids and no bank
    (:mod:`trainer.parametric`)."""
    nce_k: int = 4096
    """Noise samples per positive; 0 means the exact softmax."""
    nce_t: float = 0.07
    nce_m: float = 0.5
    nce_z: str = "ema"
    """NCE's normalising constant Z: ema (re-estimated after every step, momentum
    --nce-z-momentum; the default: on CIFAR-10 the fixed Z made the loss diverge) or
    fixed (estimated on the first step and kept, the paper's, for reproduction)."""
    nce_z_momentum: float = 0.99
    prox_lambda: float = 0.0
    lr: float = 0.03
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 0
    """Epochs of linear learning-rate warm-up before the schedule."""
    schedule: str = "step"
    """step: ×0.1 at 40 %, 60 %, 80 % of the epochs (the reference's CIFAR schedule); cosine."""
    batch_size: int = 0
    """Global batch size, split evenly across workers; 0 = the dataset's default (256, the
    reference's; 128 for the 1,437-image built-in dataset, for enough steps per epoch)."""
    epochs: int = 0
    """0 = the dataset's default (40 for the built-in dataset, 200 otherwise)."""
    num_workers: int = 1
    num_shards: int = 1
    """Store shards. One holds any bank that fits one device and costs the least per step
    (each shard is one more call per step); add shards when the bank outgrows a device."""
    use_gpu: bool = False
    precision: str = "auto"
    """The encoder's forward pass: bf16 (autocast; the bank's math stays float32), fp32, or
    auto (bf16 with --use-gpu, fp32 on a CPU, where bf16 convolutions are slower)."""
    compile: bool = False
    """Compile the encoder's training forward with torch.compile (the first steps wait for
    the compiler; evaluation runs the uncompiled module)."""
    store_name: str | None = None
    """Attach to this running store instead of creating one."""
    store_dtype: str = "float32"
    store_threads: int = 0
    """torch threads of each store shard; 0 = auto: with a local Ray this run starts, the
    machine's cores over the shards (a shard computes while the trainer waits for it),
    else 1."""
    store_gpus_per_shard: float = 0.0
    """GPUs each store shard reserves with --use-gpu (0 = share: 0.5 / num_shards, so all
    shards fit on half of one GPU; 1 = one GPU per shard, for banks near a GPU's memory)."""
    launcher: str = "ray"
    """ray: Ray Train workers and the feature store service (the default, and the only
    multi-worker path); local: the same loop in this process with an in-process bank, no
    Ray (a single GPU, a debugger, machines without Ray)."""
    bank: str = "store"
    """store: the sharded feature store service; local: an in-process MemoryBank (one
    worker only; the baseline of the trainer benchmark). Unused with --objective
    parametric, which keeps no bank."""
    resume: bool = False
    eval_every: int = 1
    checkpoint_every: int = 1
    knn_k: int = 200
    max_failures: int = 2
    """Worker-group restarts Ray Train performs from the last checkpoint."""
    loader_workers: int = 0
    """DataLoader processes per training worker (streaming path; decoding for the cache)."""
    decode: str = "auto"
    """Streaming: where JPEGs are decoded and augmented. cpu: loader processes decode (images
    of one size are then augmented as batches on the training device, like the decoded
    cache); gpu: loader processes read bytes, torchvision.io.decode_jpeg decodes batches on
    the CUDA device and augmentation runs there; auto: gpu when training on CUDA from
    streamed images of varying size, else cpu."""
    data_label: str = "cls"
    """Where labels come from when --data names existing webdataset shards (indexed once):
    cls, json:FIELD or none."""
    shuffle_buffer: int = 2000
    """Streaming: samples (encoded bytes) each loader process holds to shuffle; 0 = none.
    Memory per process ~ buffer x mean file size (2000 x 110 kB ImageNet JPEGs: 220 MB)."""
    open_shards: int = 16
    """Streaming: pieces of shards each loader process reads at once (1 = one by one)."""
    data_cache: str = "auto"
    """auto | memory | device | off: hold the dataset decoded (uint8) in host memory or on
    the training device and augment whole batches there (trainer.data.cache). auto: memory
    (device with --use-gpu) when the decoded train and val data fit --data-cache-budget and
    all images share one size; else the streaming shard loader."""
    data_cache_budget: float = 4.0
    """GiB the decoded data may take for --data-cache auto."""
    augment: str = "auto"
    """Augmentation preset: auto (by dataset: digits for the built-in set, cifar for
    images up to 64 px, imagenet above) or one of digits | cifar | imagenet."""
    image_size: int = 0
    """0 = from the dataset (32 for the built-in and CIFAR-sized images, else 224)."""
    seed: int = 0
    progress: bool = True
    storage_path: str | None = None
    """Ray Train storage (local path or s3://…); default OUTPUT/ray."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form notes kept with the config (not interpreted)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first impossible value."""

        def positive(name: str, allow_zero: bool = False) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"--{name.replace('_', '-')} must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
                bound = ">= 0" if allow_zero else "> 0"
                raise ConfigError(f"--{name.replace('_', '-')} must be {bound}, got {value}")

        for name in (
            "low_dim",
            "open_shards",
            "num_workers",
            "num_shards",
            "checkpoint_every",
            "knn_k",
            "nce_t",
            "lr",
        ):
            positive(name)
        for name in (
            "nce_k",
            "batch_size",
            "epochs",
            "prox_lambda",
            "weight_decay",
            "momentum",
            "max_failures",
            "eval_every",
            "loader_workers",
            "shuffle_buffer",
            "image_size",
            "store_gpus_per_shard",
            "data_cache_budget",
            "warmup_epochs",
            "store_threads",
        ):
            positive(name, allow_zero=True)
        if not 0 <= self.nce_m <= 1:
            raise ConfigError(f"--nce-m must be in [0, 1], got {self.nce_m}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(
                f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}"
            )
        if self.arch not in ARCHS:
            raise ConfigError(f"--arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(
                f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"
            )
        if self.resolved_batch_size % self.num_workers:
            raise ConfigError(
                f"--batch-size {self.resolved_batch_size} is not divisible by "
                f"--num-workers {self.num_workers}"
            )
        if self.data_label not in ("cls", "none") and not (
            self.data_label.startswith("json:") and len(self.data_label) > 5
        ):
            raise ConfigError(
                f"--data-label must be cls, json:FIELD or none, got {self.data_label!r}"
            )
        if self.decode not in DECODE_MODES:
            raise ConfigError(
                f"--decode must be one of {', '.join(DECODE_MODES)}, got {self.decode!r}"
            )
        if self.data_cache not in CACHE_MODES:
            raise ConfigError(
                f"--data-cache must be one of {', '.join(CACHE_MODES)}, got {self.data_cache!r}"
            )
        if self.augment not in AUGMENTS:
            raise ConfigError(
                f"--augment must be one of {', '.join(AUGMENTS)}, got {self.augment!r}"
            )
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
            )
        if self.nce_z not in NCE_Z_MODES:
            raise ConfigError(f"--nce-z must be fixed or ema, got {self.nce_z!r}")
        if not 0 <= self.nce_z_momentum < 1:
            raise ConfigError(f"--nce-z-momentum must be in [0, 1), got {self.nce_z_momentum}")
        if self.launcher not in LAUNCHERS:
            raise ConfigError(f"--launcher must be ray or local, got {self.launcher!r}")
        if self.launcher == "local" and self.num_workers != 1:
            raise ConfigError("--launcher local runs one worker: use --num-workers 1")
        if self.launcher == "local" and self.store_name is not None:
            raise ConfigError("--launcher local keeps the bank in process: drop --store-name")
        if self.bank not in BANKS:
            raise ConfigError(f"--bank must be store or local, got {self.bank!r}")
        if self.bank == "local" and self.num_workers != 1:
            raise ConfigError("--bank local keeps the bank in the worker: use --num-workers 1")
        if self.objective == "sampled-softmax" and self.nce_k == 0:
            raise ConfigError("--objective sampled-softmax needs --nce-k > 0")
        if self.objective == "parametric":
            self._validate_parametric()

    def _validate_parametric(self) -> None:
        """``--objective parametric`` keeps no bank: bank settings are errors."""
        if self.store_name is not None:
            raise ConfigError("--objective parametric keeps no bank: drop --store-name")
        if self.num_shards != 1:
            raise ConfigError("--objective parametric keeps no bank: drop --num-shards")
        if self.prox_lambda:
            raise ConfigError(
                "--prox-lambda needs a memory bank: it has no effect with --objective parametric"
            )

    @property
    def builtin(self) -> bool:
        """Whether the run uses the built-in dataset."""
        return self.data == BUILTIN

    @property
    def resolved_arch(self) -> str:
        """The encoder actually built (see :meth:`arch_choice`)."""
        return self.arch_choice()[0]

    def arch_choice(self) -> tuple[str, str]:
        """``(arch, why)``: ``--arch auto`` picks by dataset and device."""
        if self.arch != "auto":
            return self.arch, "--arch"
        if self.builtin:
            return "small", "the built-in dataset is 8x8 digits"
        if self.use_gpu:
            return "resnet18", "training on a GPU (the paper's encoder)"
        return "small-wide", (
            "training on a CPU: ResNet-18 takes days for the default epochs there, "
            "small-wide about 100 min on CIFAR-10 with 2 cores (pass --arch resnet18 to "
            "insist)"
        )

    @property
    def resolved_epochs(self) -> int:
        """The number of epochs actually run."""
        if self.epochs:
            return self.epochs
        return 40 if self.builtin else 200

    @property
    def resolved_batch_size(self) -> int:
        """The global batch size actually used."""
        if self.batch_size:
            return self.batch_size
        return 128 if self.builtin else 256

    @property
    def autocast(self) -> bool:
        """Whether the encoder runs under bf16 autocast (see ``precision``)."""
        return self.precision == "bf16" or (self.precision == "auto" and self.use_gpu)

    @property
    def resolved_bank(self) -> str:
        """store | local | none: the local launcher always keeps the bank in process;
        ``--objective parametric`` keeps none."""
        if self.objective == "parametric":
            return "none"
        return "local" if self.launcher == "local" else self.bank

    @property
    def objective_kind(self) -> str:
        """auto | nce | softmax | sampled-softmax | parametric, with ``--nce-k 0`` meaning
        the exact softmax for the bank objectives (auto is resolved against the dataset size
        by ``plan.resolve_objective``)."""
        if self.objective == "parametric":
            return self.objective
        return "softmax" if self.nce_k == 0 else self.objective

    def to_dict(self) -> dict[str, Any]:
        """Plain data (YAML/JSON-able)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from plain data; unknown keys are an error naming them."""
        names = {f.name for f in fields(cls)}
        clean = {str(k).replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(set(clean) - names)
        if unknown:
            raise ConfigError(f"unknown config key(s): {', '.join(unknown)}")
        return cls(**clean)

    def differences(self, other: TrainConfig, keys: tuple[str, ...]) -> list[str]:
        """``key: mine != other`` for each of ``keys`` that differs."""
        return [
            f"{k.removeprefix('resolved_')}: {getattr(self, k)!r} != {getattr(other, k)!r}"
            for k in keys
            if getattr(self, k) != getattr(other, k)
        ]


#: Settings a resumed run must share with the checkpoint it resumes.
RESUME_KEYS = ("data", "arch", "low_dim", "objective", "nce_k", "nce_t", "nce_m", "nce_z",
               "prox_lambda", "seed", "store_dtype", "resolved_bank")  # fmt: skip
