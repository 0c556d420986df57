"""The training run's configuration: one typed dataclass per component, composed into
:class:`TrainConfig`, read from flags and YAML.

Each setting is one field of one component (:class:`DataConfig`, :class:`ModelConfig`,
:class:`ObjectiveConfig`, :class:`OptimConfig`, :class:`BankConfig`, :class:`RunConfig`),
documented once, in its ``help``: ``python -m trainer.run --help`` (grouped by component)
and the YAML keys are generated from these fields (:mod:`trainer.flags`). Flags mirror
the reference code (``--arch --low-dim --nce-k --nce-t --nce-m --lr --batch-size
--epochs``; ``--nce-k 0`` means the exact softmax) plus the distributed ones (README,
*Training*). ``--config file.yaml`` supplies any of them (keys spelled like the flags, with
``-`` or ``_``, flat or under their component's name); flags given on the command line win
over the file. What a setting resolves to for a dataset (``auto`` values, defaults that
depend on the data) is resolved once, into :class:`trainer.plan.RunPlan`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from trainer.config_components import (
    ARCHS,
    AUGMENTS,
    BANKS,
    CACHE_MODES,
    COMPONENTS,
    CONFIG_VERSION,
    DECODE_MODES,
    DEFAULT_NCE_K,
    LAUNCHERS,
    NCE_Z_MODES,
    OBJECTIVES,
    PRECISIONS,
    SCHEDULES,
    STORE_DTYPES,
    BankConfig,
    DataConfig,
    ModelConfig,
    ObjectiveConfig,
    OptimConfig,
    RunConfig,
)
from trainer.config_fields import BUILTIN, SOFTMAX_AUTO_MAX_ROWS, ConfigError


@dataclass
class TrainConfig(RunConfig, BankConfig, OptimConfig, ObjectiveConfig, ModelConfig, DataConfig):
    """Everything a run needs, composed of its components; saved with every checkpoint."""

    components: ClassVar[tuple[tuple[str, type], ...]] = COMPONENTS

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first impossible value or combination."""
        for _name, component in COMPONENTS:
            getattr(component, f"_check_{component.__name__[:-6].lower()}")(self)
        if self.resolved_batch_size % self.num_workers:
            raise ConfigError(
                f"--batch-size {self.resolved_batch_size} is not divisible by "
                f"--num-workers {self.num_workers}"
            )
        if self.launcher == "local":
            if self.num_workers != 1:
                raise ConfigError("--launcher local runs one worker: use --num-workers 1")
            if self.store_name is not None:
                raise ConfigError("--launcher local keeps the bank in process: drop --store-name")
            if self.bank == "store":
                raise ConfigError(
                    "--launcher local keeps the bank in process (--bank local); the feature "
                    "store service needs --launcher ray"
                )
        if self.bank == "local" and self.num_workers != 1:
            raise ConfigError("--bank local keeps the bank in the worker: use --num-workers 1")
        if self.objective == "parametric":
            self._check_parametric()

    def _check_parametric(self) -> None:
        """``--objective parametric`` keeps no bank: bank settings are errors."""
        if self.store_name is not None:
            raise ConfigError("--objective parametric keeps no bank: drop --store-name")
        if self.num_shards != 1:
            raise ConfigError("--objective parametric keeps no bank: drop --num-shards")
        if self.prox_lambda:
            raise ConfigError(
                "--prox-lambda needs a memory bank: it has no effect with --objective parametric"
            )

    def component(self, name: str) -> Any:
        """The run's ``name`` component (``"data"``, ``"optim"`` …) as its own typed config."""
        kinds = dict(COMPONENTS)
        if name not in kinds:
            raise KeyError(f"no component {name!r}; choose from {', '.join(kinds)}")
        cls = kinds[name]
        return cls(**{f.name: getattr(self, f.name) for f in fields(cls)})

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
        """store | local | none: ``--bank``, auto meaning local with ``--launcher local``
        and store otherwise; ``--objective parametric`` keeps none."""
        if self.objective == "parametric":
            return "none"
        if self.bank == "auto":
            return "local" if self.launcher == "local" else "store"
        return self.bank

    def to_dict(self) -> dict[str, Any]:
        """Plain data (YAML/JSON-able), with ``config_version``."""
        return {**dataclasses.asdict(self), "config_version": CONFIG_VERSION}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from plain data: flat keys (``-`` or ``_``) or a mapping per component
        (``{"optim": {"lr": 0.1}}``); unknown keys are an error naming them. A complete
        dump of an older npid (no ``config_version``) keeps its meaning
        (:func:`trainer.config_fields.upgrade`)."""
        from trainer.config_fields import flatten, upgrade

        names = {f.name for f in fields(cls)}
        clean = upgrade(flatten(data, dict(COMPONENTS)), names)
        unknown = sorted(set(clean) - names)
        if unknown:
            raise ConfigError(f"unknown config key(s): {', '.join(unknown)}")
        return cls(**clean)

    def differences(self, other: TrainConfig, keys: tuple[str, ...]) -> list[str]:
        """``key: mine != other`` for each of ``keys`` that differs."""
        return [
            f"{k.removeprefix('resolved_').removesuffix('_kind')}: {getattr(self, k)!r} != "
            f"{getattr(other, k)!r}"
            for k in keys
            if getattr(self, k) != getattr(other, k)
        ]


#: Settings a resumed run must share with the checkpoint it resumes.
RESUME_KEYS = ("data", "arch", "low_dim", "objective_kind", "resolved_nce_k", "nce_t",
               "nce_m", "nce_z", "prox_lambda", "seed", "store_dtype", "resolved_bank")  # fmt: skip

__all__ = [
    "ARCHS",
    "AUGMENTS",
    "BANKS",
    "BUILTIN",
    "CACHE_MODES",
    "COMPONENTS",
    "DECODE_MODES",
    "DEFAULT_NCE_K",
    "LAUNCHERS",
    "NCE_Z_MODES",
    "OBJECTIVES",
    "PRECISIONS",
    "SCHEDULES",
    "SOFTMAX_AUTO_MAX_ROWS",
    "STORE_DTYPES",
    "BankConfig",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
]
