"""Training configuration: one dataclass, validated in ``__post_init__``, loaded from YAML.

Which parameters train is data (``trainable``), with NExT-GPT's choices as the per-stage
defaults. ``configs/training/*.yaml`` hold shipped examples.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

import yaml

from anymodal.config import LoraConfig, _build, _plain, load_yaml_dataclass

STAGES = (1, 2, 3)
MIXED_PRECISION = ("no", "fp16", "bf16")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
PADDING_SIDES = ("right", "left")
DENOISE_MODALITIES = ("image", "video")  # the generators the denoising loss runs through

# Parameter groups ``trainable`` may name. "input_projectors.image" narrows a group to one modality.
GROUPS = ("input_projectors", "output_projectors", "signal_tokens", "lora", "llm", "encoders")

DEFAULT_TRAINABLE = {
    1: ["input_projectors"],
    2: ["output_projectors", "signal_tokens"],
    3: ["lora", "signal_tokens", "input_projectors", "output_projectors"],
}


def _positive_int(name: str, value: Any, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"training.{name} must be an integer >= {low}, got {value!r}")


def _non_negative(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"training.{name} must be a number >= 0, got {value!r}")


def check_group(name: str) -> str:
    """Validate one ``trainable`` entry: a group, or ``group.modality`` for the projector groups."""
    from anymodal.modality import media_modalities

    group, _, modality = name.partition(".")
    if group not in GROUPS:
        raise ValueError(f"training.trainable: unknown parameter group {name!r}; expected one of "
                         f"{', '.join(GROUPS)} (projector groups may name a modality: input_projectors.image)")
    if modality:
        if group not in ("input_projectors", "output_projectors"):
            raise ValueError(f"training.trainable: only the projector groups take a modality, got {name!r}")
        if modality not in {m.value for m in media_modalities()}:
            raise ValueError(f"training.trainable: {name!r} names unknown modality {modality!r}")
    return name


@dataclass
class TrainingConfig:
    """Everything about one training run except the model (``--config``) and the data (``--data``).

    Steps count optimiser updates; one update consumes ``batch_size * gradient_accumulation_steps``
    samples per process.
    """

    stage: int = 1
    trainable: list[str] | None = None  # None: DEFAULT_TRAINABLE[stage]
    seed: int = 0
    # optimisation
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    max_grad_norm: float | None = 1.0
    lr_scheduler: str = "cosine"
    warmup_steps: int = 0
    max_steps: int | None = None  # None: run num_epochs
    num_epochs: int = 1
    mixed_precision: str = "no"  # fp16/bf16 on GPU only
    gradient_checkpointing: bool = False
    # stage-3 LoRA; None uses the model config's llm.lora, else anymodal's LoraConfig defaults
    lora: LoraConfig | None = None
    # data
    num_workers: int = 0
    max_length: int | None = None  # drop tokens past this (labels included); None: the model's limit
    padding_side: str = "right"
    max_bad_fraction: float = 0.01
    caption_prompt: str = "Describe this {modality}."  # stage 1: the user turn next to the medium
    generation_prompt: str = "{caption}"  # stage 2: the user turn
    generation_response: str = "{signal}"  # stage 2: the assistant turn; {signal} becomes the signal tokens
    # losses
    ce_weight: float = 1.0
    align_weight: float = 1.0  # per-token L2 distance to the generator's own text conditioning
    denoise_weight: float = 0.0  # > 0: add the frozen generators' denoising loss (image and video generators)
    denoise_modalities: list[str] | None = None  # which outputs get it; None: every output modality in the data
    target_cache: str | None = None  # directory for cached alignment targets; None: <out>/target_cache
    # bookkeeping
    save_every: int = 500  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2
    log_every: int = 1
    tensorboard: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"training.stage must be one of {', '.join(map(str, STAGES))}, got {self.stage!r}")
        if self.trainable is None:
            self.trainable = list(DEFAULT_TRAINABLE[self.stage])
        if not self.trainable:
            raise ValueError("training.trainable must name at least one parameter group")
        self.trainable = [check_group(g) for g in self.trainable]
        if "lora" in self.trainable and "llm" in self.trainable:
            raise ValueError("training.trainable: 'lora' and 'llm' exclude each other (LoRA trains an adapter "
                             "on a frozen LLM; 'llm' trains the LLM itself)")
        _positive_int("seed", self.seed, allow_zero=True)
        _positive_int("batch_size", self.batch_size)
        _positive_int("gradient_accumulation_steps", self.gradient_accumulation_steps)
        if isinstance(self.learning_rate, bool) or not isinstance(self.learning_rate, (int, float)) \
                or self.learning_rate <= 0:
            raise ValueError(f"training.learning_rate must be a positive number, got {self.learning_rate!r}")
        _non_negative("weight_decay", self.weight_decay)
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ValueError(f"training.adam_betas must be two numbers in [0, 1), got {self.adam_betas!r}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"training.max_grad_norm must be positive or null, got {self.max_grad_norm!r}")
        if self.lr_scheduler not in SCHEDULERS:
            raise ValueError(f"training.lr_scheduler must be one of {', '.join(SCHEDULERS)}, got {self.lr_scheduler!r}")
        _positive_int("warmup_steps", self.warmup_steps, allow_zero=True)
        if self.max_steps is not None:
            _positive_int("max_steps", self.max_steps)
        _positive_int("num_epochs", self.num_epochs)
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"training.mixed_precision must be one of {', '.join(MIXED_PRECISION)}, "
                             f"got {self.mixed_precision!r}")
        _positive_int("num_workers", self.num_workers, allow_zero=True)
        if self.max_length is not None:
            _positive_int("max_length", self.max_length)
        if self.padding_side not in PADDING_SIDES:
            raise ValueError(f"training.padding_side must be 'right' or 'left', got {self.padding_side!r}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"training.max_bad_fraction must be in [0, 1], got {self.max_bad_fraction!r}")
        for name in ("ce_weight", "align_weight", "denoise_weight"):
            _non_negative(name, getattr(self, name))
        if self.denoise_modalities is not None:
            if not self.denoise_modalities:
                raise ValueError("training.denoise_modalities must name at least one modality, or be null (all)")
            bad = [m for m in self.denoise_modalities if m not in DENOISE_MODALITIES]
            if bad:
                raise ValueError(f"training.denoise_modalities: {bad} not supported; the denoising loss "
                                 f"runs through {' and '.join(DENOISE_MODALITIES)} generators")
        if self.ce_weight == self.align_weight == self.denoise_weight == 0:
            raise ValueError("training: ce_weight, align_weight and denoise_weight are all 0; nothing would train")
        if "{signal}" not in self.generation_response:
            raise ValueError("training.generation_response must contain '{signal}' (where the signal tokens go)")
        if "{caption}" not in self.generation_prompt and "{caption}" not in self.generation_response:
            raise ValueError("training.generation_prompt or generation_response must contain '{caption}'")
        _positive_int("save_every", self.save_every, allow_zero=True)
        _positive_int("keep_checkpoints", self.keep_checkpoints)
        _positive_int("log_every", self.log_every)

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainingConfig":
        return _build(cls, data, "training")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **overrides: Any) -> "TrainingConfig":
        """Load ``path``; ``overrides`` (e.g. ``stage=2``, ``max_steps=10``) replace its values."""
        return load_yaml_dataclass(cls, path, "training config", **overrides)

    def to_dict(self) -> dict[str, Any]:
        return _plain(asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)
