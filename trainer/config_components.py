"""The components of a run's configuration, one typed dataclass each, every setting
documented once in its field (:func:`trainer.config_fields.setting`); composed into
:class:`trainer.config.TrainConfig`. Each checks its own fields."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trainer.config_fields import (
    BUILTIN,
    SOFTMAX_AUTO_MAX_ROWS,
    ConfigError,
    check_choice,
    check_number,
    setting,
)

OBJECTIVES = ("auto", "nce", "softmax", "sampled-softmax", "parametric")
BANKS = ("auto", "store", "local")
ARCHS = ("auto", "small", "small-wide", "resnet18", "resnet50")
SCHEDULES = ("step", "cosine")
DECODE_MODES = ("auto", "cpu", "gpu")
CACHE_MODES = ("auto", "memory", "device", "off")
NCE_Z_MODES = ("fixed", "ema")
LAUNCHERS = ("ray", "local")
AUGMENTS = ("auto", "digits", "cifar", "imagenet")
PRECISIONS = ("auto", "bf16", "fp32")
STORE_DTYPES = ("float32", "bfloat16", "float16")
#: K when ``--nce-k`` is not given (the paper's m = 4096).
DEFAULT_NCE_K = 4096
#: What ``to_dict`` writes as ``config_version``: 2 since ``--nce-k`` and ``--bank`` may be
#: left unset (None / auto); complete dumps without it come from older npid.
CONFIG_VERSION = 2


@dataclass
class DataConfig:
    """data: what is trained and evaluated on, and how it reaches the encoder."""

    data: str = setting(
        BUILTIN,
        "training data: a make_shards directory or URL (s3://, gs://, http://, pipe:); "
        "webdataset tar URLs, brace patterns ('train-{000000..000099}.tar') or a folder of "
        f".tar files (indexed once, not copied); or '{BUILTIN}', the built-in dataset",
    )
    val_data: str | None = setting(
        None, "validation shards for the kNN evaluation (built-in data: its test split)"
    )
    data_label: str = setting(
        "cls", "labels of existing webdataset shards named by --data: cls, json:FIELD or none"
    )
    augment: str = setting(
        "auto",
        "augmentation preset; auto: digits for the built-in set, cifar for images up to "
        "64 px, imagenet above",
        choices=AUGMENTS,
    )
    image_size: int = setting(
        0, "input side in pixels; 0: by dataset (32 up to 64 px images, else 224)"
    )
    data_cache: str = setting(
        "auto",
        "hold the dataset decoded (uint8) in host memory (memory) or on the training device "
        "(device) and augment whole batches there, or stream the shards (off); auto: memory "
        "(device with --use-gpu) when the decoded data fit --data-cache-budget and all images "
        "share one size, else off",
        choices=CACHE_MODES,
    )
    data_cache_budget: float = setting(4.0, "GiB the decoded data may take with --data-cache auto")
    decode: str = setting(
        "auto",
        "streaming: where JPEGs are decoded and augmented: cpu (loader processes; images of "
        "one size then augmented in batches on the training device), gpu (loader processes "
        "read bytes, torchvision decode_jpeg decodes batches on the CUDA device, augmentation "
        "there); auto: gpu on CUDA for streamed images of varying size, else cpu",
        choices=DECODE_MODES,
    )
    loader_workers: int = setting(
        0, "DataLoader processes per worker (streaming; decoding for the cache)"
    )
    shuffle_buffer: int = setting(
        2000,
        "streaming: samples (encoded bytes) each loader process holds to shuffle; 0: none "
        "(memory ~ buffer x mean file size: 2000 x 110 kB ImageNet JPEGs = 220 MB)",
    )
    open_shards: int = setting(
        16, "streaming: pieces of shards each loader process reads at once (1: one by one)"
    )

    def __post_init__(self) -> None:
        self._check_data()

    def _check_data(self) -> None:
        check_number(self, "open_shards")
        for name in ("loader_workers", "shuffle_buffer", "image_size", "data_cache_budget"):
            check_number(self, name, allow_zero=True)
        if self.data_label not in ("cls", "none") and not (
            self.data_label.startswith("json:") and len(self.data_label) > 5
        ):
            raise ConfigError(
                f"--data-label must be cls, json:FIELD or none, got {self.data_label!r}"
            )
        for name in ("augment", "data_cache", "decode"):
            check_choice(self, name)

    @property
    def builtin(self) -> bool:
        """Whether the run uses the built-in dataset."""
        return self.data == BUILTIN


@dataclass
class ModelConfig:
    """model: the encoder and how its forward pass runs."""

    arch: str = setting(
        "auto",
        "encoder; auto: small on the built-in data, resnet18 with --use-gpu, small-wide on a CPU",
        choices=ARCHS,
    )
    low_dim: int = setting(128, "embedding size d")
    precision: str = setting(
        "auto",
        "the encoder's forward pass: bf16 (autocast; the bank's math stays float32), fp32, or "
        "auto: bf16 with --use-gpu, fp32 on a CPU (where bf16 convolutions are slower)",
        choices=PRECISIONS,
    )
    compile: bool = setting(
        False,
        "torch.compile the encoder's training forward (the first steps wait for the "
        "compiler; evaluation runs the uncompiled module)",
        switch=True,
    )

    def __post_init__(self) -> None:
        self._check_model()

    def _check_model(self) -> None:
        check_number(self, "low_dim")
        check_choice(self, "arch")
        check_choice(self, "precision")


@dataclass
class ObjectiveConfig:
    """objective: what the encoder learns against the bank."""

    objective: str = setting(
        "auto",
        f"auto: the exact softmax up to {SOFTMAX_AUTO_MAX_ROWS:,} instances, the sampled "
        "softmax above (its step cost does not grow with N), or NCE when --nce-k is given; "
        "nce: the paper's NCE; parametric: the paper's baseline, a learned N-way classifier "
        "over instance ids (no bank; kNN on recomputed features)",
        choices=OBJECTIVES,
    )
    nce_k: int | None = setting(
        None,
        f"noise samples K per positive (NCE, sampled softmax; {DEFAULT_NCE_K} when not given); "
        "0: the exact softmax. Given with --objective auto it asks for the paper's NCE",
        shown_default=DEFAULT_NCE_K,
    )
    nce_t: float = setting(0.07, "temperature τ")
    nce_z: str = setting(
        "ema",
        "NCE's normalising constant Z: ema (re-estimated after every step, momentum "
        "--nce-z-momentum; on CIFAR-10 the fixed Z made the loss diverge) or fixed "
        "(estimated on the first step and kept: the paper's, for reproduction)",
        choices=NCE_Z_MODES,
    )
    nce_z_momentum: float = setting(0.99, "momentum of --nce-z ema")
    prox_lambda: float = setting(0.0, "proximal regularisation λ (the paper's §3.4; 0: off)")

    def __post_init__(self) -> None:
        self._check_objective()

    def _check_objective(self) -> None:
        check_number(self, "nce_t")
        check_number(self, "prox_lambda", allow_zero=True)
        if self.nce_k is not None:
            check_number(self, "nce_k", allow_zero=True)
        check_choice(self, "objective")
        check_choice(self, "nce_z")
        if not 0 <= self.nce_z_momentum < 1:
            raise ConfigError(f"--nce-z-momentum must be in [0, 1), got {self.nce_z_momentum}")
        if self.objective == "sampled-softmax" and self.nce_k == 0:
            raise ConfigError("--objective sampled-softmax needs --nce-k > 0")

    @property
    def resolved_nce_k(self) -> int:
        """K: ``--nce-k``, or :data:`DEFAULT_NCE_K` when not given."""
        return DEFAULT_NCE_K if self.nce_k is None else self.nce_k

    @property
    def objective_kind(self) -> str:
        """auto | nce | softmax | sampled-softmax | parametric: ``--nce-k 0`` is the exact
        softmax and a given ``--nce-k`` turns auto into NCE (auto is otherwise resolved
        against the dataset size by ``plan.resolve_objective``)."""
        if self.objective == "parametric":
            return self.objective
        if self.nce_k == 0:
            return "softmax"
        if self.objective == "auto" and self.nce_k is not None:
            return "nce"
        return self.objective


@dataclass
class OptimConfig:
    """optimiser: SGD and its schedule."""

    lr: float = setting(0.03, "learning rate (SGD)")
    momentum: float = setting(0.9, "SGD momentum")
    weight_decay: float = setting(5e-4, "SGD weight decay")
    warmup_epochs: int = setting(0, "epochs of linear learning-rate warm-up before the schedule")
    schedule: str = setting(
        "step",
        "step: ×0.1 at 40/60/80 % of the epochs (the reference's CIFAR schedule); cosine",
        choices=SCHEDULES,
    )
    batch_size: int = setting(
        0,
        "global batch size (default: 128 on the built-in data, 256 otherwise), split evenly "
        "across workers (the 1,437-image built-in data gets 128 for enough steps per epoch)",
        zero_is_default=True,
    )
    epochs: int = setting(
        0, "epochs (default: 40 on the built-in data, 200 otherwise)", zero_is_default=True
    )

    def __post_init__(self) -> None:
        self._check_optim()

    def _check_optim(self) -> None:
        check_number(self, "lr")
        for name in ("momentum", "weight_decay", "warmup_epochs", "batch_size", "epochs"):
            check_number(self, name, allow_zero=True)
        check_choice(self, "schedule")


@dataclass
class BankConfig:
    """bank: the memory bank, in process or as the feature store service."""

    bank: str = setting(
        "auto",
        "store: the sharded feature store service; local: an in-process bank (one worker; "
        "the trainer benchmark's baseline); auto: local with --launcher local, else store. "
        "Unused with --objective parametric, which keeps no bank",
        choices=BANKS,
    )
    nce_m: float = setting(0.5, "memory bank momentum m")
    num_shards: int = setting(
        1,
        "feature store shards: one holds any bank that fits one device and costs the least "
        "per step; add shards when the bank outgrows a device",
    )
    store_name: str | None = setting(
        None, "attach to this running feature store instead of creating one"
    )
    store_dtype: str = setting(
        "float32", "row storage of the bank (its math is float32)", choices=STORE_DTYPES
    )
    store_threads: int = setting(
        0,
        "torch threads per store shard; 0: with a local Ray this run starts, the machine's "
        "cores over the shards (a shard computes while the trainer waits for it), else 1",
    )
    store_gpus_per_shard: float = setting(
        0.0,
        "GPUs each store shard reserves with --use-gpu; 0: share (0.5 / num_shards, all "
        "shards on half of one GPU); 1: one GPU per shard, for banks near a GPU's memory",
    )

    def __post_init__(self) -> None:
        self._check_bank()

    def _check_bank(self) -> None:
        check_number(self, "num_shards")
        check_number(self, "store_threads", allow_zero=True)
        check_number(self, "store_gpus_per_shard", allow_zero=True)
        if not 0 <= self.nce_m <= 1:
            raise ConfigError(f"--nce-m must be in [0, 1], got {self.nce_m}")
        check_choice(self, "bank")
        check_choice(self, "store_dtype")


@dataclass
class RunConfig:
    """run: where it runs, what it writes and how it is evaluated and restarted."""

    output: str = setting(
        "runs/npid", "output directory: metrics.jsonl, checkpoints under ray/, the encoder"
    )
    launcher: str = setting(
        "ray",
        "ray: Ray Train workers and the feature store service (the default, and the only "
        "multi-worker path); local: the same loop in this process with an in-process bank, "
        "no Ray (a single GPU, a debugger, machines without Ray)",
        choices=LAUNCHERS,
    )
    num_workers: int = setting(1, "Ray Train workers (data parallel)")
    use_gpu: bool = setting(False, "train on GPUs (workers and store shards)", switch=True)
    seed: int = setting(0, "seed of the model, the bank, the data order and the noise")
    resume: bool = setting(
        False, "continue the newest checkpoint under --output (and --storage-path)", switch=True
    )
    eval_every: int = setting(1, "kNN evaluation every N epochs; 0: never (throughput runs)")
    checkpoint_every: int = setting(1, "checkpoint (model, optimizer, bank) every N epochs")
    knn_k: int = setting(200, "neighbours k of the kNN vote")
    max_failures: int = setting(
        2, "worker-group restarts Ray Train performs from the last checkpoint"
    )
    progress: bool = setting(
        True, "no progress bar (bars are shown only on a terminal anyway)", flag="--no-progress"
    )
    storage_path: str | None = setting(
        None, "Ray Train storage (local path or s3://…)", shown_default="OUTPUT/ray"
    )
    extra: dict[str, Any] = field(default_factory=dict, metadata={"cli": False})
    """Free-form notes kept with the config (not interpreted; YAML only)."""

    def __post_init__(self) -> None:
        self._check_run()

    def _check_run(self) -> None:
        for name in ("num_workers", "checkpoint_every", "knn_k"):
            check_number(self, name)
        for name in ("max_failures", "eval_every"):
            check_number(self, name, allow_zero=True)
        check_choice(self, "launcher")


#: The components in ``--help`` order, each with its YAML section name.
COMPONENTS: tuple[tuple[str, type], ...] = (
    ("data", DataConfig),
    ("model", ModelConfig),
    ("objective", ObjectiveConfig),
    ("optim", OptimConfig),
    ("bank", BankConfig),
    ("run", RunConfig),
)
