"""``anymodal toyworld train``: train the toy world's components from scratch, phase by phase.

Phases (run in this order; each one resumable)
    tokenizer        a word-level tokenizer (``tokenizers`` WordLevel + Whitespace, lowercased, with
                     ``[PAD]``/``[UNK]``/``<s>``/``</s>``) over every caption and dialogue text the
                     world produces, saved as a transformers ``PreTrainedTokenizerFast`` directory.
    image-generator  a diffusers ``StableDiffusionPipeline`` at tiny size on the world's 64x64
                     images (train split only): a tiny ``AutoencoderKL`` trained first for
                     reconstruction (64x64x3 -> 16x16x4), then a ``UNet2DConditionModel`` and a
                     tiny ``CLIPTextModel`` trained jointly on the VAE's latents (v-prediction,
                     ``squaredcos_cap_v2`` DDPM, AdamW with warmup + cosine, EMA, 10% caption
                     dropout). It is saved with a ``DPMSolverMultistepScheduler`` (sample with 20
                     steps and guidance 3) and loads with ``StableDiffusionPipeline.from_pretrained``
                     and through anymodal's ``stable-diffusion`` generator adapter.
    audio-generator  a diffusers ``AudioLDMPipeline`` at tiny size on the world's tones (train split
                     only): 64x64 log-mel spectrograms (64 frames x 64 HTK bands, n_fft 1024, hop
                     256), a one-channel ``AutoencoderKL`` (-> 16x16x8), a ``UNet2DConditionModel``
                     conditioned through a class embedding on a tiny ``ClapTextModelWithProjection``
                     (AudioLDM's layout), and a weightless Griffin-Lim vocoder
                     (:class:`~anymodal.toyworld.vocoder.GriffinLimVocoder`, NNLS mel inversion) in
                     the vocoder's place. Loads through anymodal's ``audioldm`` adapter.
    manifests        the training data as files (PNG, WAV, GIF) and anymodal.training manifests
                     (``data/``), sized by the ``stages`` settings.
    encoder          a tiny ImageBind (image, audio, video), trained with one linear classifier per
                     world field on its pooled embedding.
    llm              a tiny Llama pretrained on world dialogues, with the tokenizer plus anymodal's tokens.
    stages           anymodal stages 1, 2, 3 on the components above and the generators; LoRA merged,
                     saved to ``final/`` and scored with ``anymodal eval``'s checkers.
    (The last four are :mod:`anymodal.toyworld.model_phases`; a phase refuses to start, naming the
    command to run, when a phase it reads from has not finished; see ``REQUIRES``.)

Layout of ``--out`` (default ``runs/toyworld``)
    tokenizer/, image-generator/, audio-generator/, data/, encoder/, llm/, final/
                                   the finished, loadable components (final/: the whole pipeline)
    stages/stage<N>/               the anymodal.training runs of the stages phase
    state/<phase>/                 checkpoints (``*.ckpt``, written to a temporary file and
                                   ``os.replace``d), cached latents, the phase's settings
                                   (``config.json``) and, once finished, ``done.json``
    logs/<phase>.jsonl             one record per logged step, per checkpoint and per evaluation

Resuming
    Every random draw of a training loop (batch indices, noise, timesteps, caption dropout, the
    VAE's posterior sample) comes from one ``torch.Generator`` whose state is checkpointed with
    the weights, the optimiser and the EMA; the learning rate is a pure function of the step.
    On CPU with a fixed thread count, stopping at a checkpoint and resuming therefore gives
    bit-identical weights to an uninterrupted run (``tests/test_toyworld_train.py`` checks it).
    Evaluation runs under a forked RNG with its own seeds, so it does not disturb training.

Evaluation
    Each generator phase samples prompts from seen (train split) and held-out combinations
    (colour x shape for images, note x waveform for audio), generates through its anymodal
    adapter and scores the outputs with :mod:`anymodal.toyworld.checkers` (no learned model).
    Figures go to the phase log and to ``<results>/toyworld-<phase>.json``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..modality import Modality
from ..utils import atomic_write_text, quiet_loading
from . import checkers, world

if TYPE_CHECKING:
    from .model_phases import EncoderPhase, LLMPhase, StagesPhase
    from .video_generator import VideoGeneratorPhase

PHASES: tuple[str, ...] = ("tokenizer", "image-vae", "image-generator", "audio-generator", "video-generator",
                           "manifests", "encoder", "llm", "stages")
# The phases each phase reads from; run_phase refuses to start until they have finished.
REQUIRES: dict[str, tuple[str, ...]] = {
    "tokenizer": (),
    # The image VAE is a phase of its own so that the video generator, which encodes its frames with
    # it, trains beside the image UNet instead of after it (13 minutes off the critical path here).
    "image-vae": (),
    "image-generator": ("tokenizer", "image-vae"),
    "audio-generator": ("tokenizer",),
    "video-generator": ("tokenizer", "image-vae"),
    "manifests": (),
    "encoder": (),
    "llm": ("tokenizer", "encoder"),  # the LLM is pretrained reading the encoder's features
    "stages": ("tokenizer", "image-vae", "image-generator", "audio-generator", "video-generator", "manifests",
               "encoder", "llm"),
}
# Where each phase's result lives in --out, and the file whose presence means it finished.
OUTPUTS: dict[str, tuple[str, str]] = {
    "tokenizer": ("tokenizer", "tokenizer.json"),
    "image-vae": ("image-vae", "diffusion_pytorch_model.safetensors"),
    "image-generator": ("image-generator", "model_index.json"),
    "audio-generator": ("audio-generator", "model_index.json"),
    "video-generator": ("video-generator", "model_index.json"),
    "manifests": ("data", "manifest.json"),
    "encoder": ("encoder", "model.safetensors"),
    "llm": ("llm", "config.json"),
    "stages": ("final", "anymodal_index.json"),
}

# The audio front end: a log-mel spectrogram of magnitudes (HTK mel bands without normalisation,
# the checkers' filterbank), n_fft 1024 and hop 256 at 16 kHz: 64 frames x 64 bands per clip.
# Features are (log(max(mel, 1e-5)) + MEL_SHIFT) / MEL_SCALE, about -1.4 (silence) to 1.4.
MEL_NFFT, MEL_HOP, MEL_BANDS = 1024, 256, 64
MEL_FRAMES = world.CLIP_SAMPLES // MEL_HOP
MEL_FLOOR, MEL_SHIFT, MEL_SCALE = 1e-5, 3.0, 6.0
SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "<s>", "</s>")


# ============================================================================ configuration


@dataclass
class TokenizerPhase:
    """How the word-level tokenizer is built. ``dialogues`` sampled dialogues (both splits) add
    every question, answer and edit instruction to the captions of every spec of the world."""

    dialogues: int = 20000
    seed: int = 0
    model_max_length: int = 128  # what the LLM may use; the image text encoder keeps its own, shorter limit

    def __post_init__(self) -> None:
        _check_positive("tokenizer.dialogues", self.dialogues)
        _check_positive("tokenizer.model_max_length", self.model_max_length)


def _default_vae() -> dict[str, Any]:
    # Three blocks: 64x64x3 -> 16x16x8 (6x fewer numbers; with 4 latent channels a short run kept
    # neither colours nor corners). The world's images are flat colours with sharp edges, which a
    # narrow VAE reconstructs; no mid-block attention (nothing global to model).
    return {"in_channels": 3, "out_channels": 3, "latent_channels": 8,
            "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
            "block_out_channels": [8, 16, 32], "layers_per_block": 1, "norm_num_groups": 4,
            "sample_size": world.IMAGE_SIZE, "mid_block_add_attention": False}


def _default_unet() -> dict[str, Any]:
    # shared/ENVIRONMENT.md's recipe (channels 32/64/64, one layer per block, cross-attention width
    # 64, 8 norm groups) on the VAE's 16x16x8 latents, with attention at 8x8 only: the 256-token
    # self-attention at 16x16 was a third of a training step (half the step time without it; held
    # out colour/shape/position held within run-to-run spread, docs/toyworld.md).
    return {"sample_size": 16, "in_channels": 8, "out_channels": 8, "layers_per_block": 1,
            "block_out_channels": [32, 64, 64],
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "cross_attention_dim": 64, "attention_head_dim": 4, "norm_num_groups": 8}


def _default_text_encoder() -> dict[str, Any]:
    # CLIPTextConfig; vocab size and special ids come from the tokenizer.
    return {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2,
            "max_position_embeddings": 24}


@dataclass
class DiffusionRecipe:
    """What the generator phases share: a VAE first (reconstruction, L1 + MSE plus a small KL, as in
    Stable Diffusion's first stage; all convolutions, so it trains on random crops, 4x cheaper at
    32 of 64 px, starting on the latent grid), then the UNet and its text encoder jointly
    (v-prediction cosine DDPM, AdamW with warm-up then cosine, EMA, caption dropout), with
    periodic evaluation through the anymodal adapter. Each phase sets its own sizes and defaults."""

    seed: int = 0
    bank_size: int = 4096  # renders of the train split, made once
    prompt_length: int = 24  # tokens the pipeline pads prompts to (<= the text encoder's positions)
    vae_steps: int = 1000
    vae_batch_size: int = 32
    vae_crop: int = 32
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    # UNet + text encoder
    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 1e-2
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    # bookkeeping
    checkpoint_every: int = 100
    log_every: int = 10
    eval_every: int = 500  # 0: evaluate only at the end
    eval_prompts: int = 16  # per split, at each periodic evaluation
    final_eval_prompts: int = 40  # per split, at the end
    sample_steps: int = 20
    guidance_scale: float = 3.0


@dataclass
class ImageGeneratorPhase(DiffusionRecipe):
    """The tiny Stable Diffusion: architecture (diffusers / transformers kwargs) and training recipe."""

    bank_size: int = 8192
    vae_steps: int = 1500
    steps: int = 6000  # shape and position need far more steps than colour (2,000: shape at chance)
    vae: dict[str, Any] = field(default_factory=_default_vae)
    unet: dict[str, Any] = field(default_factory=_default_unet)
    text_encoder: dict[str, Any] = field(default_factory=_default_text_encoder)

    def __post_init__(self) -> None:
        _check_recipe("image_generator", self)
        positions = self.text_encoder.get("max_position_embeddings", 77)
        if self.prompt_length > positions:
            raise ValueError(f"image_generator.prompt_length ({self.prompt_length}) exceeds "
                             f"text_encoder.max_position_embeddings ({positions})")
        if self.text_encoder.get("hidden_size") != self.unet.get("cross_attention_dim"):
            raise ValueError("image_generator: text_encoder.hidden_size and unet.cross_attention_dim must agree, got "
                             f"{self.text_encoder.get('hidden_size')} and {self.unet.get('cross_attention_dim')}")


def _default_audio_vae() -> dict[str, Any]:
    # The image VAE on one channel: a (64 frames x 64 mel bands) log-mel "image" -> 16x16x8.
    return _default_vae() | {"in_channels": 1, "out_channels": 1, "sample_size": MEL_FRAMES}


def _default_audio_unet() -> dict[str, Any]:
    # AudioLDM's layout: the CLAP text embedding enters as a class embedding (concatenated with the
    # time embedding); attention blocks attend to the latents themselves (AudioLDM passes no
    # encoder states), so each block's cross_attention_dim is its own width.
    return {"sample_size": 16, "in_channels": 8, "out_channels": 8, "layers_per_block": 1,
            "block_out_channels": [32, 64, 64],
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "cross_attention_dim": [32, 64, 64], "attention_head_dim": 4, "norm_num_groups": 8,
            "class_embed_type": "simple_projection", "projection_class_embeddings_input_dim": 64,
            "class_embeddings_concat": True}


def _default_clap_text() -> dict[str, Any]:
    # ClapTextConfig (a RoBERTa: positions start after the padding id, so 24 tokens need 26).
    return {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2,
            "max_position_embeddings": 26, "projection_dim": 64, "type_vocab_size": 1}


def _default_vocoder() -> dict[str, Any]:
    # GriffinLimVocoder kwargs (no weights): the front end's constants, 32 Griffin-Lim iterations.
    return {"model_in_dim": MEL_BANDS, "sampling_rate": world.SAMPLE_RATE, "n_fft": MEL_NFFT,
            "upsample_rates": [MEL_HOP], "mel_shift": MEL_SHIFT, "mel_scale": MEL_SCALE, "mel_floor": MEL_FLOOR,
            "n_iter": 32}


@dataclass
class AudioGeneratorPhase(DiffusionRecipe):
    """The tiny AudioLDM: a mel VAE, a UNet and a CLAP text encoder, with a Griffin-Lim vocoder.

    Training order: the VAE on log-mels, then UNet + text encoder on the VAE latents, with the
    image recipe. The vocoder (:class:`~anymodal.toyworld.vocoder.GriffinLimVocoder`) has no
    weights; it is scored on real mels first, which bounds the pipeline's pitch accuracy.
    """

    steps: int = 1600
    vocoder: dict[str, Any] = field(default_factory=_default_vocoder)
    # Weight of an auxiliary loss: a linear head on the pooled CLAP embedding predicts the
    # caption's note, waveform and duration. Without it the from-scratch text tower gave nearly
    # one embedding for every note (cosine 0.9997), so the UNet could not hear the pitch. It
    # stands in for real CLAP's contrastive text-audio pre-training; 0 turns it off.
    text_aux_weight: float = 0.1
    vae: dict[str, Any] = field(default_factory=_default_audio_vae)
    unet: dict[str, Any] = field(default_factory=_default_audio_unet)
    text_encoder: dict[str, Any] = field(default_factory=_default_clap_text)

    def __post_init__(self) -> None:
        _check_recipe("audio_generator", self)
        if self.text_encoder.get("max_position_embeddings", 514) < self.prompt_length + 2:
            raise ValueError(f"audio_generator.text_encoder.max_position_embeddings must be at least prompt_length + 2 "
                             f"({self.prompt_length + 2}) for a RoBERTa-style text encoder")
        if self.text_encoder.get("projection_dim") != self.unet.get("projection_class_embeddings_input_dim"):
            raise ValueError("audio_generator: text_encoder.projection_dim and "
                             "unet.projection_class_embeddings_input_dim must agree")


def _check_recipe(where: str, cfg: Any) -> None:
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and f.name not in (
                "seed", "kl_weight", "weight_decay", "caption_dropout", "eval_every", "warmup_steps",
                "text_aux_weight"):
            _check_positive(f"{where}.{f.name}", value)
    if not 0.0 <= cfg.caption_dropout < 1.0:
        raise ValueError(f"{where}.caption_dropout must be in [0, 1), got {cfg.caption_dropout!r}")
    if not 0.0 < cfg.ema_decay < 1.0:
        raise ValueError(f"{where}.ema_decay must be in (0, 1), got {cfg.ema_decay!r}")


@dataclass
class ToyworldTrainConfig:
    """Every phase's settings. ``preset("default")`` is what ``anymodal toyworld train`` runs;
    ``preset("smoke")`` is a seconds-long version for tests and for checking an installation."""

    tokenizer: TokenizerPhase = field(default_factory=TokenizerPhase)
    image_generator: ImageGeneratorPhase = field(default_factory=ImageGeneratorPhase)
    audio_generator: AudioGeneratorPhase = field(default_factory=AudioGeneratorPhase)
    # video_generator imports this module too: the same late lookup
    video_generator: VideoGeneratorPhase = field(default_factory=lambda: _video_generator().VideoGeneratorPhase())
    # model_phases imports this module, so its settings classes are looked up when first needed
    encoder: EncoderPhase = field(default_factory=lambda: _model_phases().EncoderPhase())
    llm: LLMPhase = field(default_factory=lambda: _model_phases().LLMPhase())
    stages: StagesPhase = field(default_factory=lambda: _model_phases().StagesPhase())

    @classmethod
    def preset(cls, name: str) -> "ToyworldTrainConfig":
        if name == "default":
            return cls()
        if name == "smoke":
            vae = _default_vae() | {"block_out_channels": [8, 8, 8]}
            unet = _default_unet() | {"block_out_channels": [16, 16, 16], "norm_num_groups": 4,
                                      "cross_attention_dim": 16}
            text = _default_text_encoder() | {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
                                              "num_hidden_layers": 1}
            small = dict(vae_steps=4, vae_batch_size=4, steps=4, batch_size=4, warmup_steps=1, checkpoint_every=2,
                         log_every=1, eval_every=0, eval_prompts=2, final_eval_prompts=2, sample_steps=2)
            audio_unet = _default_audio_unet() | {"block_out_channels": [16, 16, 16], "norm_num_groups": 4,
                                                  "cross_attention_dim": [16, 16, 16],
                                                  "projection_class_embeddings_input_dim": 16}
            clap = _default_clap_text() | {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
                                           "num_hidden_layers": 1, "projection_dim": 16}
            vocoder = _default_vocoder() | {"n_iter": 2}
            model = _model_phases().ModelPhasesConfig.preset("smoke")
            return cls(TokenizerPhase(dialogues=500),
                       ImageGeneratorPhase(bank_size=64, vae=vae, unet=unet, text_encoder=text, **small),
                       AudioGeneratorPhase(bank_size=32, vae=_default_audio_vae() | {"block_out_channels": [8, 8, 8]},
                                           unet=audio_unet, text_encoder=clap, vocoder=vocoder, **small),
                       _video_generator().VideoGeneratorPhase.smoke(), model.encoder, model.llm, model.stages)
        raise ValueError(f"unknown preset {name!r}; expected one of: {', '.join(PRESETS)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_overrides(self, overrides: Sequence[str]) -> "ToyworldTrainConfig":
        """A copy with ``section.field=value`` overrides applied (values parsed as YAML),
        e.g. ``image_generator.steps=2000`` or ``image_generator.unet={...}``."""
        import yaml

        sections = {f.name: getattr(self, f.name) for f in fields(self)}
        for item in overrides:
            key, sep, raw = item.partition("=")
            section, dot, name = key.strip().partition(".")
            if not sep or not dot:
                raise ValueError(f"override {item!r} must look like section.field=value, e.g. image_generator.steps=2000")
            if section not in sections:
                raise ValueError(f"override {item!r}: unknown section {section!r}; expected one of: "
                                 f"{', '.join(sections)}")
            known = {f.name: f for f in fields(sections[section])}
            if name not in known:
                raise ValueError(f"override {item!r}: {section} has no field {name!r}; expected one of: "
                                 f"{', '.join(known)}")
            value = yaml.safe_load(raw)
            current = getattr(sections[section], name)
            if isinstance(current, tuple) and isinstance(value, list):  # stages.lr=[1e-3,1e-3,5e-4]
                value = tuple(_as_float(v) if current and isinstance(current[0], float) else v for v in value)
            if isinstance(current, float):
                value = _as_float(value)
            if type(value) is not type(current):
                raise ValueError(f"override {item!r}: {section}.{name} takes a {type(current).__name__}, "
                                 f"got {type(value).__name__}")
            sections[section] = replace(sections[section], **{name: value})  # __post_init__ validates
        return replace(self, **sections)


PRESETS: tuple[str, ...] = ("default", "smoke")


def _as_float(value: Any) -> Any:
    """``value`` as a float where it reads as one (YAML reads 1e-3, without a dot, as a string)."""
    if isinstance(value, bool):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def _model_phases() -> Any:
    from . import model_phases  # imports this module: not at the top

    return model_phases


def _video_generator() -> Any:
    from . import video_generator  # imports this module: not at the top

    return video_generator


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


# ============================================================================ small machinery


class JsonlLog:
    """An append-only JSONL log of one phase. :meth:`rewind` drops what a resumed run will redo."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record: Any) -> None:
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()), **record}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def rewind(self, stage: str, step: int) -> None:
        """Drop the records of ``stage`` after ``step`` (work lost since the checkpoint being resumed)."""
        kept = [r for r in self.records() if not (r.get("stage") == stage and r.get("step", 0) > step)]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then ``os.replace`` it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_dir(path: Path, write: Callable[[Path], None]) -> Path:
    """Let ``write`` fill a temporary directory beside ``path``, then swap it in for ``path``.

    A crash leaves either the old directory or the new one, never a half-written mix.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    old = path.parent / f".{path.name}.old"
    try:
        write(tmp)
        if old.exists():
            shutil.rmtree(old)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


class EMA:
    """Exponential moving average of parameters, with the usual warm-up of the decay."""

    def __init__(self, modules: Sequence[torch.nn.Module], decay: float):
        self.decay = decay
        self.params = [p for m in modules for p in m.parameters() if p.requires_grad]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - d)

    @torch.no_grad()
    def copy_to(self, modules: Sequence[torch.nn.Module]) -> None:
        targets = [p for m in modules for p in m.parameters() if p.requires_grad]
        if len(targets) != len(self.shadow):
            raise ValueError(f"EMA holds {len(self.shadow)} tensors, the modules have {len(targets)}")
        for t, s in zip(targets, self.shadow):
            t.copy_(s)

    def state_dict(self) -> list[torch.Tensor]:
        return [s.clone() for s in self.shadow]

    def load_state_dict(self, state: list[torch.Tensor]) -> None:
        if len(state) != len(self.shadow):
            raise ValueError(f"EMA checkpoint holds {len(state)} tensors, expected {len(self.shadow)}")
        for s, v in zip(self.shadow, state):
            s.copy_(v)


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to zero at ``total``."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class Stop(Exception):
    """Raised inside a loop when ``--max-minutes`` or ``stop_at_step`` is reached (after a checkpoint)."""


@dataclass
class RunControl:
    """When to stop this invocation: a wall-clock deadline and, for tests, a step to stop at."""

    deadline: float | None = None
    stop_at_step: int | None = None
    progress: bool = True
    device: str = "cpu"  # where the phases train and evaluate (resolve_device's answer)
    threads: "ThreadShare | None" = None  # set in a worker of a parallel run that shares idle cores

    def should_stop(self, step: int) -> bool:
        if self.stop_at_step is not None and step >= self.stop_at_step:
            return True
        return self.deadline is not None and time.time() >= self.deadline


class ThreadShare:
    """How many torch threads one phase of a parallel run may use, as the scheduler last said.

    The scheduler (:func:`_train_parallel`) rewrites a small JSON file, ``{phase: threads}``,
    whenever phases start or end; :func:`train_loop` calls :meth:`follow` between steps, which
    re-reads it only when it changed and applies this phase's share with ``torch.set_num_threads``.
    """

    def __init__(self, path: Path, phase: str, current: int | None = None):
        self.path, self.phase, self.current = Path(path), phase, current  # current: the count set at start
        self._seen: tuple[int, int, int] | None = None

    @staticmethod
    def split(budget: int, phases: Sequence[str]) -> dict[str, int]:
        """``budget`` threads over ``phases`` (in start order): equal shares, the first ones get the rest."""
        each, extra = divmod(budget, max(len(phases), 1))
        return {p: max(1, each + (i < extra)) for i, p in enumerate(phases)}

    def follow(self) -> int | None:
        """Apply this phase's share if the file changed since the last call; the new count, or None."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        if (st.st_ino, st.st_mtime_ns, st.st_size) == self._seen:  # rewritten by rename: a new inode
            return None
        self._seen = (st.st_ino, st.st_mtime_ns, st.st_size)
        try:
            n = json.loads(self.path.read_text()).get(self.phase)
        except (OSError, ValueError):  # written atomically, so only a foreign edit gets here
            return None
        if not isinstance(n, int) or n < 1 or n == self.current:
            return None
        self.current = n
        torch.set_num_threads(n)
        return n


DEVICES = "cpu, cuda, cuda:N or auto"


def resolve_device(device: str | torch.device | None) -> str:
    """The device the phases run on: ``"auto"`` (or ``None``) is ``"cuda"`` when torch sees a GPU and
    ``"cpu"`` otherwise; a named device must exist on this machine (``ValueError`` naming it if not)."""
    if device is None or str(device) == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r}; expected {DEVICES}") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: torch sees no CUDA GPU on this machine "
                             "(torch.cuda.is_available() is False); use cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                             f"numbered from 0")
    elif dev.type != "cpu":  # mps: the stages' loss bookkeeping is float64, which MPS lacks
        raise ValueError(f"device {device!r} is not supported here; expected {DEVICES}")
    return str(dev)


def device_of(module: torch.nn.Module) -> torch.device:
    """Where ``module``'s first parameter lives (the phases move whole models, so all of it)."""
    return next(module.parameters()).device


def _progress(total: int, initial: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not enabled, dynamic_ncols=True,
                mininterval=2.0, smoothing=0.1)


def train_loop(*, stage: str, total: int, ckpt: Path, modules: dict[str, torch.nn.Module],
               optimizer: torch.optim.Optimizer, gen: torch.Generator, ema: EMA | None,
               step_fn: Callable[[int], float], lr_fn: Callable[[int], float], log: JsonlLog,
               checkpoint_every: int, log_every: int, control: RunControl,
               on_step: Callable[[int], None] | None = None) -> None:
    """Run ``step_fn(step)`` (one optimiser step, returns the loss) from the last checkpoint to ``total``.

    Checkpoints hold the modules, optimiser, EMA, RNG state and step, and are written every
    ``checkpoint_every`` steps, at the end, and before stopping early (raising :class:`Stop`).
    Each step runs with torch's global generator seeded from ``gen``'s seed and the step (and
    restored afterwards), so modules that draw from it (dropout in a text encoder) are reproducible
    and resume bit for bit too.
    """
    base_seed = gen.initial_seed()  # the caller's seed, read before a checkpoint's state replaces it

    def save(step: int) -> None:
        atomic_save({"step": step, "modules": {k: m.state_dict() for k, m in modules.items()},
                     "optimizer": optimizer.state_dict(), "ema": ema.state_dict() if ema else None,
                     "rng": gen.get_state()}, ckpt)
        log.write(stage=stage, step=step, event="checkpoint")

    start = 0
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        for k, m in modules.items():
            m.load_state_dict(state["modules"][k])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        gen.set_state(state["rng"])
        start = int(state["step"])
        log.rewind(stage, start)
        if start < total:
            log.write(stage=stage, step=start, event="resume")
    if start >= total:
        return
    for m in modules.values():
        m.train()
    bar = _progress(total, start, stage, control.progress)
    t0, s0, running = time.time(), start, None
    try:
        for step in range(start, total):
            lr = lr_fn(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed((base_seed * 1_000_003 + step) % 2**63)
                loss = step_fn(step)
            if ema is not None:
                ema.update(step)
            done = step + 1
            if control.threads is not None and (n := control.threads.follow()) is not None:
                log.write(stage=stage, step=done, event="threads", threads=n)
            running = loss if running is None else 0.95 * running + 0.05 * loss
            rate = (done - s0) / max(time.time() - t0, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{running:.4f}", lr=f"{lr:.2e}", refresh=False)
            if done % log_every == 0 or done == total:
                log.write(stage=stage, step=done, loss=loss, loss_avg=running, lr=lr, steps_per_s=rate)
            if done % checkpoint_every == 0 or done == total:
                save(done)
            if on_step is not None:
                on_step(done)
            if done < total and control.should_stop(done):
                if done % checkpoint_every:
                    save(done)
                raise Stop(f"{stage}: stopped at step {done}/{total}; rerun with --resume to continue")
    finally:
        bar.close()
    for m in modules.values():
        m.eval()


# ============================================================================ phase: tokenizer


def world_texts(n_dialogues: int, seed: int) -> Iterator[str]:
    """Every caption of every spec (both splits), the audio captions prompts leave partial, and
    the texts of ``n_dialogues`` sampled dialogues per split (prompts, questions, answers, edits)."""
    for m in (Modality.IMAGE, Modality.AUDIO, Modality.VIDEO):
        for spec in world.all_specs(m, "all"):
            yield spec.caption()
            if isinstance(spec, world.AudioSpec):
                yield replace(spec, note=None).caption()
                yield replace(spec, duration=None).caption()
    g = np.random.default_rng(seed)
    for split in world.SPLITS:
        for _ in range(n_dialogues):
            for _, text in world.sample_dialogue(g, split, render_media=False).texts():
                yield text


def build_tokenizer(texts: Iterator[str], model_max_length: int) -> Any:
    """A word-level ``PreTrainedTokenizerFast``: lowercased, split on whitespace and punctuation,
    ``<s> ... </s>`` around every text, right padding with ``[PAD]``, ``[UNK]`` for unknown words."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS), min_frequency=1))
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", pair="<s> $A </s> $B </s>",
                                                       special_tokens=[("<s>", bos), ("</s>", eos)])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, tidies "word ?"
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="<s>",
                                   eos_token="</s>", model_max_length=model_max_length, padding_side="right")


def train_tokenizer(out: Path, cfg: TokenizerPhase, log: JsonlLog) -> Path:
    t0 = time.time()
    texts = list(world_texts(cfg.dialogues, cfg.seed))
    tokenizer = build_tokenizer(iter(texts), cfg.model_max_length)
    unknown = sum(tokenizer.unk_token_id in ids for ids in tokenizer(texts[-2000:])["input_ids"])
    path = atomic_dir(out / "tokenizer", tokenizer.save_pretrained)
    longest = max(len(ids) for ids in tokenizer(texts)["input_ids"])
    log.write(stage="tokenizer", event="done", vocab_size=len(tokenizer), texts=len(texts), longest_tokens=longest,
              unknown_in_last_2000=unknown, seconds=round(time.time() - t0, 2))
    return path


def load_tokenizer(out: Path) -> Any:
    from transformers import PreTrainedTokenizerFast

    path = out / "tokenizer"
    if not (path / "tokenizer.json").exists():
        raise ValueError(f"no trained tokenizer in {path}; run the 'tokenizer' phase first "
                         f"(anymodal toyworld train --out {out} --phase tokenizer)")
    return PreTrainedTokenizerFast.from_pretrained(str(path))


# ============================================================================ phase: image generator


def _images_to_tensor(data: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [-1, 1], what Stable Diffusion's VAE takes."""
    return torch.from_numpy(data).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def text_config_kwargs(tokenizer: Any, overrides: dict[str, Any]) -> dict[str, Any]:
    """A text encoder config's kwargs: vocabulary size and special ids from the word-level tokenizer,
    then the phase's ``overrides`` (sizes)."""
    return {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, **overrides}


def eval_with_ema(models: dict[str, torch.nn.Module], ema: EMA, assemble: Callable[[dict[str, torch.nn.Module]], Any],
                  evaluate_pipeline: Callable[..., dict[str, Any]], cfg: Any, n: int) -> dict[str, Any]:
    """Evaluate the EMA weights of ``unet`` and ``text_encoder`` on copies (the training weights stay
    untouched): ``evaluate_pipeline(assemble(copies), n, seed, steps, guidance)``."""
    copies = {k: copy.deepcopy(m).eval() for k, m in models.items()}
    ema.copy_to([copies["unet"], copies["text_encoder"]])
    return evaluate_pipeline(assemble(copies), n, cfg.seed + 1000, cfg.sample_steps, cfg.guidance_scale)


def caption_aux_loss(specs: Sequence[world.Spec], fields_: Sequence[tuple[str, Sequence[str]]], dim: int, cfg: Any,
                     features: Callable[[torch.Tensor], torch.Tensor]
                     ) -> tuple[torch.nn.Module | None, Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None]:
    """The auxiliary text loss of the generator phases (``cfg.text_aux_weight``; ``(None, None)`` at 0):
    a training-only linear head on ``features(tokens)`` (``dim`` wide) predicts each caption's
    ``fields_`` (name, values), so that a from-scratch text encoder keeps them apart."""
    if cfg.text_aux_weight <= 0:
        return None, None
    labels = torch.tensor([[values.index(getattr(sp, name)) for name, values in fields_] for sp in specs])
    sizes = [len(values) for _, values in fields_]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 4)
        head = torch.nn.Linear(dim, sum(sizes))

    def loss(tokens: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        logits = torch.split(head(features(tokens)), sizes, dim=-1)
        return cfg.text_aux_weight * sum(F.cross_entropy(z, labels[idx, k].to(z.device)) for k, z in enumerate(logits))

    return head, loss


def _build_image_models(cfg: ImageGeneratorPhase, tokenizer: Any) -> dict[str, torch.nn.Module]:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        vae = _new_vae(cfg.vae)
        unet = UNet2DConditionModel(**cfg.unet)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config_kwargs(tokenizer, cfg.text_encoder)))
    return {"vae": vae, "unet": unet, "text_encoder": text_encoder}


def _to_device(models: dict[str, torch.nn.Module], device: str) -> dict[str, torch.nn.Module]:
    """Move every model of a phase to ``device`` (built on the CPU, so the same initial weights everywhere)."""
    for m in models.values():
        m.to(device)
    return models


def _new_vae(spec: dict[str, Any]) -> Any:
    """A fresh ``AutoencoderKL(**spec)`` (drawing from torch's global generator) whose posterior starts
    nearly deterministic (std e^-6): a fresh VAE's std of 1 buries the means under noise, and a short
    training run then learns only blurry averages. The KL term may still widen it; the pipelines
    decode the latents they are given."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**spec)
    if vae.quant_conv is not None:
        c = vae.config.latent_channels
        with torch.no_grad():
            vae.quant_conv.weight[c:].zero_()
            vae.quant_conv.bias[c:].fill_(-12.0)
    return vae


def _noise_scheduler() -> Any:
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")


def _assemble_pipeline(models: dict[str, torch.nn.Module], tokenizer: Any, cfg: ImageGeneratorPhase) -> Any:
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    tok = copy.deepcopy(tokenizer)
    tok.model_max_length = cfg.prompt_length
    # steps_offset only matters for "leading" spacing; 1 is what StableDiffusionPipeline checks for.
    scheduler = DPMSolverMultistepScheduler.from_config(_noise_scheduler().config, steps_offset=1)
    with quiet_loading():  # no notice that the wrapped pipeline class is deprecated
        pipe = StableDiffusionPipeline(vae=models["vae"], text_encoder=models["text_encoder"], tokenizer=tok,
                                       unet=models["unet"], scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def eval_specs(n: int, seed: int) -> dict[str, list[world.ImageSpec]]:
    """``n`` seen (train split) and ``n`` held-out image specs, fixed by ``seed``."""
    return {split_name: world.sample_specs(Modality.IMAGE, n, seed + k, split)  # type: ignore[misc]
            for k, (split_name, split) in enumerate((("seen", "train"), ("heldout", "heldout")))}


def score_images(images: Sequence[Any], specs: Sequence[world.ImageSpec]) -> dict[str, float]:
    """Fraction of images whose checker reading matches each field of the spec, plus ``ok`` (all)."""
    scores = [checkers.score_image(img, spec) for img, spec in zip(images, specs)]
    keys = sorted({k for s in scores for k in s})
    return {k: round(float(np.mean([s.get(k, False) for s in scores])), 4) for k in keys}


def evaluate_image_pipeline(pipe: Any, n: int, seed: int, steps: int, guidance: float) -> dict[str, Any]:
    """Generate ``n`` seen and ``n`` held-out prompts with ``pipe`` and score them analytically."""
    out: dict[str, Any] = {}
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        for split, specs in eval_specs(n, seed).items():
            g = torch.Generator().manual_seed(seed)
            t0 = time.time()
            images = pipe([s.caption() for s in specs], num_inference_steps=steps, guidance_scale=guidance,
                          generator=g, output_type="np").images
            out[split] = score_images(list(images), specs) | {"n": len(specs),
                                                                 "s_per_image": round((time.time() - t0) / n, 3)}
    return out


def evaluate_image_generator(directory: Path, n: int, seed: int, steps: int, guidance: float,
                             device: str = "cpu") -> dict[str, Any]:
    """Load a saved pipeline through anymodal's ``stable-diffusion`` adapter and score it.

    The prompts are encoded by the generator's own text encoder (``encode_text``) and generated
    with ``generate``: exactly the path the anymodal pipeline drives.
    """
    import anymodal.generators  # noqa: F401  (registers the adapters)
    from anymodal.config import GeneratorConfig
    from anymodal.registry import GENERATORS

    cls = GENERATORS.get("stable-diffusion")
    gen = cls.from_config(GeneratorConfig(type="stable-diffusion", pretrained=str(directory),
                                          settings={"num_inference_steps": steps, "guidance_scale": guidance}))
    gen.to(device)
    out: dict[str, Any] = {}
    with torch.random.fork_rng(devices=[]):
        for split, specs in eval_specs(n, seed).items():
            t0 = time.time()
            cond = gen.encode_text([s.caption() for s in specs])
            images = gen.generate(cond, generator=torch.Generator().manual_seed(seed))
            out[split] = score_images(images, specs) | {"n": len(specs),
                                                           "s_per_image": round((time.time() - t0) / n, 3)}
    return out


def _train_vae(vae: Any, data: torch.Tensor, cfg: Any, ckpt: Path, log: JsonlLog, control: RunControl,
               where: str) -> None:
    """Train ``vae`` to reconstruct ``data`` (N, C, H, W) on random crops: L1 + MSE + a small KL."""
    gen = torch.Generator().manual_seed(cfg.seed)  # on the CPU: the same draws on every device
    device = device_of(vae)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    grid = 2 ** (len(vae.config.block_out_channels) - 1)
    crop = min(cfg.vae_crop, data.shape[-1], data.shape[-2])
    if crop % grid:
        raise ValueError(f"{where}.vae_crop ({crop}) must be a multiple of the VAE's downsampling ({grid})")

    def vae_step(step: int) -> float:
        idx = torch.randint(len(data), (cfg.vae_batch_size,), generator=gen)
        x = data[idx].to(device)
        if crop < x.shape[-1] or crop < x.shape[-2]:
            y0, x0 = (torch.randint((x.shape[-1] - crop) // grid + 1, (2,), generator=gen) * grid).tolist()
            x = x[:, :, y0:y0 + crop, x0:x0 + crop]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + cfg.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    train_loop(stage="vae", total=cfg.vae_steps, ckpt=ckpt, modules={"vae": vae}, optimizer=opt,
               gen=gen, ema=None, step_fn=vae_step,
               lr_fn=lambda s: cosine_lr(s, cfg.vae_steps, cfg.vae_lr, min(cfg.warmup_steps, cfg.vae_steps // 10)),
               log=log, checkpoint_every=cfg.checkpoint_every, log_every=cfg.log_every, control=control)
    vae.eval().requires_grad_(False)


def _latents(vae: Any, data: torch.Tensor, path: Path, log: JsonlLog, step: int,
             reconstruction: Callable[[], dict[str, Any]]) -> torch.Tensor:
    """Encode ``data`` once (posterior means, scaled to unit variance, on the CPU; cached in ``path``) and
    set the VAE's ``scaling_factor``. ``reconstruction()`` scores the VAE when the cache is first made."""
    if path.exists():
        cached = torch.load(path, map_location="cpu", weights_only=True)
        latents, scaling = cached["latents"], float(cached["scaling_factor"])
    else:
        with torch.no_grad():
            device = device_of(vae)
            means = torch.cat([vae.encode(data[i:i + 256].to(device)).latent_dist.mean.cpu()
                               for i in range(0, len(data), 256)])
        scaling = float(1.0 / means.std())
        latents = means * scaling
        log.write(stage="vae", step=step, event="latents", scaling_factor=scaling,
                  latent_mean=float(latents.mean()), reconstruction=reconstruction())
        atomic_save({"latents": latents, "scaling_factor": scaling}, path)
    vae.register_to_config(scaling_factor=scaling)
    return latents


def _train_denoiser(unet: Any, text_encoder: Any, condition: Callable[[torch.Tensor], dict[str, Any]],
                    latents: torch.Tensor, ids: torch.Tensor, empty: torch.Tensor, cfg: Any, ckpt: Path,
                    log: JsonlLog, control: RunControl,
                    evaluate: Callable[[EMA, int], dict[str, Any]] | None,
                    aux_head: torch.nn.Module | None = None,
                    aux_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> EMA:
    """Train the UNet and the text encoder jointly (v-prediction DDPM), returning the EMA.

    ``condition(tokens)`` returns the UNet's conditioning keyword arguments exactly as the
    pipeline computes them from the tokenizer's ids; captions are replaced by the empty prompt
    (the pipeline's negative prompt) with probability ``caption_dropout``. ``aux_loss(tokens,
    idx)`` (with its training-only ``aux_head``, checkpointed but not saved in the pipeline) is
    added to the loss for the rows whose caption was kept.
    """
    noise_sched = _noise_scheduler()
    device = device_of(unet)
    if aux_head is not None:
        aux_head.to(device)
    trainable = [unet, text_encoder]
    params = [p for m in trainable for p in m.parameters()]
    params += list(aux_head.parameters()) if aux_head is not None else []
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = EMA(trainable, cfg.ema_decay)
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # on the CPU: the same draws on every device
    n_train = noise_sched.config.num_train_timesteps

    def unet_step(step: int) -> float:
        idx = torch.randint(len(latents), (cfg.batch_size,), generator=gen)
        x0 = latents[idx]
        tokens = ids[idx].clone()
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.caption_dropout
        tokens[drop] = empty
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(n_train, (cfg.batch_size,), generator=gen)
        x0, noise, t, tokens = x0.to(device), noise.to(device), t.to(device), tokens.to(device)
        noisy = noise_sched.add_noise(x0, noise, t)
        target = noise_sched.get_velocity(x0, noise, t)
        pred = unet(noisy, t, **condition(tokens)).sample
        loss = F.mse_loss(pred, target)
        if aux_loss is not None and bool((~drop).any()):
            keep = ~drop
            loss = loss + aux_loss(tokens[keep.to(device)], idx[keep])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return float(loss.detach())

    def periodic_eval(step: int) -> None:
        if evaluate is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            log.write(stage="unet", step=step, event="eval", prompts_per_split=cfg.eval_prompts,
                      **evaluate(ema, cfg.eval_prompts))

    modules = {"unet": unet, "text_encoder": text_encoder} | ({"aux_head": aux_head} if aux_head is not None else {})
    train_loop(stage="unet", total=cfg.steps, ckpt=ckpt, modules=modules, optimizer=opt, gen=gen, ema=ema, step_fn=unet_step,
               lr_fn=lambda s: cosine_lr(s, cfg.steps, cfg.lr, cfg.warmup_steps), log=log,
               checkpoint_every=cfg.checkpoint_every, log_every=cfg.log_every, control=control,
               on_step=periodic_eval)
    return ema


def _tokens(tokenizer: Any, texts: list[str], length: int) -> torch.Tensor:
    return tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")["input_ids"]


def _image_bank(cfg: ImageGeneratorPhase) -> tuple[world.Bank, torch.Tensor]:
    bank = world.make_bank(Modality.IMAGE, cfg.bank_size, "train", seed=cfg.seed)
    return bank, _images_to_tensor(bank.data)


def train_image_vae(out: Path, cfg: ImageGeneratorPhase, log: JsonlLog, control: RunControl) -> Path:
    """The ``image-vae`` phase: the image generator's ``AutoencoderKL`` (``image_generator.vae*``
    settings), saved to ``out / "image-vae"``. The image and video generators both encode with it.

    A run directory whose ``image-generator`` finished before this phase existed already holds the
    trained VAE (``image-generator/vae``): it is exported as it is, without training.
    """
    from diffusers import AutoencoderKL

    older = out / "image-generator" / "vae"
    if (older / "config.json").is_file():
        vae = AutoencoderKL.from_pretrained(str(older))
        log.write(stage="vae", event="exported", source=str(older))
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            vae = _new_vae(cfg.vae)  # as _build_image_models draws it, first
        vae.to(control.device)
        bank, pixels = _image_bank(cfg)
        log.write(stage="data", event="bank", n=len(bank), split="train", seed=cfg.seed,
                  params={"vae": sum(p.numel() for p in vae.parameters())})
        _train_vae(vae, pixels, cfg, out / "state" / "image-vae" / "vae.ckpt", log, control, "image_generator")
    return atomic_dir(out / "image-vae", lambda d: vae.save_pretrained(str(d), safe_serialization=True))


def train_image_generator(out: Path, cfg: ImageGeneratorPhase, log: JsonlLog, control: RunControl) -> Path:
    """The ``image-generator`` phase: the UNet and CLIP text encoder on the ``image-vae`` phase's
    latents, assembled with that VAE into a ``StableDiffusionPipeline`` in ``out / "image-generator"``."""
    from diffusers import AutoencoderKL

    state_dir = out / "state" / "image-generator"
    state_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(out)
    models = _to_device(_build_image_models(cfg, tokenizer), control.device)
    vae, unet, text_encoder = models["vae"], models["unet"], models["text_encoder"]
    vae.load_state_dict(AutoencoderKL.from_pretrained(str(out / "image-vae")).state_dict())
    vae.eval().requires_grad_(False)

    bank, pixels = _image_bank(cfg)
    log.write(stage="data", event="bank", n=len(bank), split="train", seed=cfg.seed,
              params={k: sum(p.numel() for p in m.parameters()) for k, m in models.items()})

    latents = _latents(vae, pixels, state_dir / "latents.pt", log, cfg.vae_steps,
                       lambda: _vae_reconstruction_scores(vae, bank))
    ids = _tokens(tokenizer, bank.captions, cfg.prompt_length)
    empty = _tokens(tokenizer, [""], cfg.prompt_length)

    def condition(tokens: torch.Tensor) -> dict[str, Any]:
        return {"encoder_hidden_states": text_encoder(tokens)[0]}  # what StableDiffusionPipeline.encode_prompt does

    def evaluate(ema: EMA, n: int) -> dict[str, Any]:
        return eval_with_ema(models, ema, lambda m: _assemble_pipeline(m, tokenizer, cfg), evaluate_image_pipeline,
                             cfg, n)

    ema = _train_denoiser(unet, text_encoder, condition, latents, ids, empty, cfg, state_dir / "unet.ckpt", log,
                          control, evaluate)
    ema.copy_to([unet, text_encoder])  # save the EMA weights
    pipe = _assemble_pipeline(models, tokenizer, cfg)
    return atomic_dir(out / "image-generator", lambda d: pipe.save_pretrained(str(d), safe_serialization=True))


def _vae_reconstruction_scores(vae: Any, bank: world.Bank, n: int = 200) -> dict[str, float]:
    """Checker accuracy of VAE reconstructions (of the posterior mean): the ceiling of the diffusion model."""
    n = min(n, len(bank))
    with torch.no_grad():
        x = _images_to_tensor(bank.data[:n]).to(device_of(vae))
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample
    images = ((recon.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return score_images(list(images), bank.specs[:n])


# ============================================================================ phase: audio generator


def log_mel_features(waves: torch.Tensor) -> torch.Tensor:
    """(B, CLIP_SAMPLES) waveforms -> (B, MEL_FRAMES, MEL_BANDS) normalised log-mel features:
    what the vocoder takes and what the mel VAE encodes (as a one-channel image)."""
    window = torch.hann_window(MEL_NFFT)
    spec = torch.stft(waves, MEL_NFFT, MEL_HOP, window=window, center=True, return_complex=True).abs()
    spec = spec[..., : waves.shape[-1] // MEL_HOP]
    fb = torch.as_tensor(checkers._mel_filterbank(MEL_BANDS, MEL_NFFT, world.SAMPLE_RATE), dtype=spec.dtype)
    mel = torch.log(torch.clamp(fb @ spec, min=MEL_FLOOR))
    return ((mel + MEL_SHIFT) / MEL_SCALE).transpose(1, 2)


def _build_audio_models(cfg: AudioGeneratorPhase, tokenizer: Any) -> dict[str, torch.nn.Module]:
    from diffusers import UNet2DConditionModel
    from transformers import ClapTextConfig, ClapTextModelWithProjection

    from .vocoder import GriffinLimVocoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        vae = _new_vae(cfg.vae)
        unet = UNet2DConditionModel(**cfg.unet)
        text_encoder = ClapTextModelWithProjection(ClapTextConfig(**text_config_kwargs(tokenizer, cfg.text_encoder)))
        vocoder = GriffinLimVocoder(**cfg.vocoder)
    return {"vae": vae, "unet": unet, "text_encoder": text_encoder, "vocoder": vocoder}


def _assemble_audio_pipeline(models: dict[str, torch.nn.Module], tokenizer: Any, cfg: AudioGeneratorPhase) -> Any:
    from diffusers import AudioLDMPipeline, DPMSolverMultistepScheduler

    tok = copy.deepcopy(tokenizer)
    tok.model_max_length = cfg.prompt_length
    scheduler = DPMSolverMultistepScheduler.from_config(_noise_scheduler().config, steps_offset=1)
    with quiet_loading():
        pipe = AudioLDMPipeline(vae=models["vae"], text_encoder=models["text_encoder"], tokenizer=tok,
                                unet=models["unet"], scheduler=scheduler, vocoder=models["vocoder"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def audio_eval_specs(n: int, seed: int) -> dict[str, list[world.AudioSpec]]:
    """``n`` seen (train split) and ``n`` held-out (note x waveform pairs) audio specs."""
    return {name: world.sample_specs(Modality.AUDIO, n, seed + k, split)  # type: ignore[misc]
            for k, (name, split) in enumerate((("seen", "train"), ("heldout", "heldout")))}


def score_audios(waves: Sequence[np.ndarray], specs: Sequence[world.AudioSpec]) -> dict[str, float]:
    """Fraction of clips whose checker reading matches each field (note, waveform, duration, register)."""
    scores = [checkers.score_audio(np.asarray(w, dtype=np.float32).reshape(-1), world.SAMPLE_RATE, spec)
              for w, spec in zip(waves, specs)]
    keys = sorted({k for sc in scores for k in sc})
    return {k: round(float(np.mean([sc.get(k, False) for sc in scores])), 4) for k in keys}


def evaluate_audio_pipeline(pipe: Any, n: int, seed: int, steps: int, guidance: float) -> dict[str, Any]:
    """Generate ``n`` seen and ``n`` held-out prompts with ``pipe`` and score the waveforms analytically."""
    out: dict[str, Any] = {}
    seconds = world.CLIP_SAMPLES / world.SAMPLE_RATE
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        for split, specs in audio_eval_specs(n, seed).items():
            t0 = time.time()
            waves = pipe([s.caption() for s in specs], audio_length_in_s=seconds, num_inference_steps=steps,
                         guidance_scale=guidance, generator=torch.Generator().manual_seed(seed),
                         output_type="np").audios
            out[split] = score_audios(list(waves), specs) | {"n": len(specs),
                                                              "s_per_clip": round((time.time() - t0) / n, 3)}
    return out


def evaluate_audio_generator(directory: Path, n: int, seed: int, steps: int, guidance: float,
                             device: str = "cpu") -> dict[str, Any]:
    """Load a saved pipeline through anymodal's ``audioldm`` adapter and score its waveforms."""
    import anymodal.generators  # noqa: F401  (registers the adapters)
    from anymodal.config import GeneratorConfig
    from anymodal.registry import GENERATORS

    seconds = world.CLIP_SAMPLES / world.SAMPLE_RATE
    gen = GENERATORS.get("audioldm").from_config(GeneratorConfig(
        type="audioldm", pretrained=str(directory),
        settings={"num_inference_steps": steps, "guidance_scale": guidance, "audio_length_s": seconds}))
    gen.to(device)
    out: dict[str, Any] = {}
    with torch.random.fork_rng(devices=[]):
        for split, specs in audio_eval_specs(n, seed).items():
            t0 = time.time()
            cond = gen.encode_text([s.caption() for s in specs])
            audios = gen.generate(cond, generator=torch.Generator().manual_seed(seed))
            if audios and audios[0].sample_rate != world.SAMPLE_RATE:
                raise ValueError(f"{directory}: the vocoder runs at {audios[0].sample_rate} Hz, "
                                 f"expected {world.SAMPLE_RATE}")
            out[split] = score_audios([a.array for a in audios], specs) | {
                "n": len(specs), "s_per_clip": round((time.time() - t0) / n, 3)}
    return out


def train_audio_generator(out: Path, cfg: AudioGeneratorPhase, log: JsonlLog, control: RunControl) -> Path:
    state_dir = out / "state" / "audio-generator"
    state_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(out)
    models = _to_device(_build_audio_models(cfg, tokenizer), control.device)
    vae, unet, text_encoder, vocoder = (models[k] for k in ("vae", "unet", "text_encoder", "vocoder"))

    bank = world.make_bank(Modality.AUDIO, cfg.bank_size, "train", seed=cfg.seed)
    waves = torch.from_numpy(bank.data)
    features = log_mel_features(waves)  # (N, frames, bands)
    log.write(stage="data", event="bank", n=len(bank), split="train", seed=cfg.seed,
              params={k: sum(p.numel() for p in m.parameters()) for k, m in models.items()})

    # ---------------------------------------------------------------- 1. the vocoder, on real log-mels
    scored = state_dir / "vocoder-scores.json"
    if not scored.exists():  # the vocoder alone on real mels: the ceiling of the pipeline's pitch
        specs = audio_eval_specs(cfg.final_eval_prompts, cfg.seed + 3000)
        figures = {}
        with torch.no_grad():
            for split, ss in specs.items():
                real = torch.from_numpy(np.stack([world.render(sp, np.random.default_rng(i))
                                                  for i, sp in enumerate(ss)]))
                figures[split] = score_audios(list(vocoder(log_mel_features(real).to(control.device)).cpu().numpy()), ss)
        log.write(stage="vocoder", step=0, event="eval", on="real log-mels", **figures)
        atomic_write_text(scored, json.dumps(figures) + "\n")

    # ---------------------------------------------------------------- 2. the mel VAE
    mels = features[:, None]  # (N, 1, frames, bands)

    def reconstruction() -> dict[str, Any]:
        n = min(100, len(bank))
        with torch.no_grad():
            recon = vae.decode(vae.encode(mels[:n].to(control.device)).latent_dist.mean).sample[:, 0]
        return score_audios(list(vocoder(recon).cpu().numpy()), bank.specs[:n])

    _train_vae(vae, mels, cfg, state_dir / "vae.ckpt", log, control, "audio_generator")
    latents = _latents(vae, mels, state_dir / "latents.pt", log, cfg.vae_steps, reconstruction)

    # ---------------------------------------------------------------- 3. UNet + CLAP text encoder
    ids = _tokens(tokenizer, bank.captions, cfg.prompt_length)
    empty = _tokens(tokenizer, [""], cfg.prompt_length)
    pad = tokenizer.pad_token_id

    def condition(tokens: torch.Tensor) -> dict[str, Any]:
        # what AudioLDMPipeline._encode_prompt does: CLAP text_embeds, L2-normalised, as class labels
        embeds = text_encoder(tokens, attention_mask=(tokens != pad).long()).text_embeds
        return {"encoder_hidden_states": None, "class_labels": F.normalize(embeds, dim=-1)}

    def evaluate(ema: EMA, n: int) -> dict[str, Any]:
        return eval_with_ema(models, ema, lambda m: _assemble_audio_pipeline(m, tokenizer, cfg),
                             evaluate_audio_pipeline, cfg, n)

    def pooled(tokens: torch.Tensor) -> torch.Tensor:  # the unit class embedding, rescaled to unit variance
        embeds = condition(tokens)["class_labels"]
        return embeds * embeds.shape[-1] ** 0.5

    fields_ = (("note", tuple(world.NOTES)), ("waveform", world.WAVEFORMS), ("duration", tuple(world.DURATIONS)))
    aux_head, aux_loss = caption_aux_loss(bank.specs, fields_, text_encoder.config.projection_dim, cfg, pooled)

    ema = _train_denoiser(unet, text_encoder, condition, latents, ids, empty, cfg, state_dir / "unet.ckpt", log,
                          control, evaluate, aux_head, aux_loss)
    ema.copy_to([unet, text_encoder])
    pipe = _assemble_audio_pipeline(models, tokenizer, cfg)
    return atomic_dir(out / "audio-generator", lambda d: pipe.save_pretrained(str(d), safe_serialization=True))


# ============================================================================ driver


@dataclass
class PhaseResult:
    phase: str
    status: str  # "done", "skipped" (already done), "stopped" (deadline; resumable)
    path: str | None = None
    figures: dict[str, Any] | None = None
    message: str = ""


def _machine(device: str = "cpu") -> dict[str, Any]:
    info = {"platform": platform.platform(), "processor": platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "device": device}
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _median_rate(log: JsonlLog, stage: str) -> float | None:
    """Median steps/s of ``stage`` over the logged records (all runs of the phase), for the results file."""
    rates = [r["steps_per_s"] for r in log.records() if r.get("stage") == stage and "steps_per_s" in r]
    return round(float(np.median(rates)), 3) if rates else None


_GENERATOR_PHASES: dict[str, tuple[Callable[..., Path], Callable[..., dict[str, Any]]]] = {
    "image-generator": (train_image_generator, evaluate_image_generator),
    "audio-generator": (train_audio_generator, evaluate_audio_generator),
    "video-generator": (lambda *a: _video_generator().train_video_generator(*a),
                        lambda *a, **k: _video_generator().evaluate_video_generator(*a, **k)),
}
_EVALUATION_NOTES = {
    "image-generator": "checkers.score_image on prompts = spec.caption() of specs sampled from the train split "
                       "(seen) and from held-out colour x shape pairs (heldout); generated through the "
                       "stable-diffusion adapter with DPM-Solver++ and classifier-free guidance",
    "audio-generator": "checkers.score_audio on prompts = spec.caption() of specs sampled from the train split "
                       "(seen) and from held-out note x waveform pairs (heldout); generated through the audioldm "
                       "adapter (its Griffin-Lim vocoder) with DPM-Solver++ and classifier-free guidance",
}


def _phase_config(cfg: ToyworldTrainConfig, phase: str) -> Any:
    if phase == "image-vae":  # the image generator's section holds its VAE's settings
        return cfg.image_generator
    return getattr(cfg, phase.replace("-", "_"))


def _phase_settings(cfg: ToyworldTrainConfig, phase: str) -> dict[str, Any]:
    """The settings a phase's run is bound to (checked on resume)."""
    if phase == "manifests":  # sized by the stages section
        return {k: getattr(cfg.stages, k) for k in ("n_captions", "n_dialogues", "seed")}
    return asdict(_phase_config(cfg, phase))


def check_requirements(phase: str, out: Path) -> None:
    """Raise ``ValueError`` naming the first phase ``phase`` reads from that has not finished in ``out``."""
    for need in REQUIRES[phase]:
        directory, marker = OUTPUTS[need]
        if not (out / directory / marker).is_file():
            raise ValueError(f"{phase} needs the {need!r} phase, which has not finished in {out} "
                             f"(no {out / directory / marker}); run the {need!r} phase first "
                             f"(anymodal toyworld train --out {out} --phase {need})")


def _run_model_phase(phase: str, out: Path, cfg: ToyworldTrainConfig, log: JsonlLog, control: RunControl
                     ) -> tuple[Path, dict[str, Any] | None]:
    """One of model_phases' phases; returns its result's path and its figures."""
    mp = _model_phases()
    st = cfg.stages
    if phase == "manifests":
        return mp.write_manifests(out, st.n_captions, st.n_dialogues, st.seed), None
    if phase == "encoder":
        path = mp.train_encoder(out, cfg.encoder, log, control)
    elif phase == "llm":
        path = mp.train_llm(out, cfg.llm, log, control)
    else:
        from ..pipeline import AnyModalPipeline
        from .evaluate import evaluate

        path = mp.run_stages(out, mp.ModelPhasesConfig(cfg.encoder, cfg.llm, cfg.stages), log, control)
        results = evaluate(AnyModalPipeline.from_pretrained(path, device=control.device), n=st.eval_prompts,
                           split="heldout", seed=st.seed, progress=control.progress)
        figures = {"heldout": {d: r.to_dict() for d, r in results.items()}}
        log.write(stage="final", event="eval", prompts_per_direction=st.eval_prompts, **figures)
        return path, figures
    written = out / "state" / phase / "figures.json"
    return path, (json.loads(written.read_text()) if written.exists() else None)


def check_same_config(path: Path, current: dict[str, Any], phase: str) -> None:
    """Record a phase's settings at its first start; a resumed run must use the same ones."""
    current = json.loads(json.dumps(current))  # tuples -> lists, as stored
    if not path.exists():
        atomic_write_text(path, json.dumps(current, indent=2) + "\n")
        return
    saved = json.loads(path.read_text())
    changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if changed:
        raise ValueError(f"{phase}: the unfinished run in {path.parent} was started with other settings "
                         f"({', '.join(changed)} differ); resume with the same preset and --set overrides, "
                         f"or delete {path.parent}")


def _use_device(device: str) -> None:
    """On a GPU: make it torch's current CUDA device (what ``"cuda"`` means to accelerate in the stages
    and to diffusers) and allow TF32 matmuls and convolutions (the usual speed of fp32 training)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return
    if dev.index is not None:
        torch.cuda.set_device(dev)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def run_phase(phase: str, out: Path, cfg: ToyworldTrainConfig, control: RunControl, results_dir: Path | None,
              resume: bool) -> PhaseResult:
    """Run (or resume) one phase; returns what happened. Raises ``ValueError`` on misuse."""
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; expected one of: {', '.join(PHASES)}")
    state_dir = out / "state" / phase
    done_file = state_dir / "done.json"
    if done_file.exists():
        return PhaseResult(phase, "skipped", str(out / OUTPUTS[phase][0]),
                           json.loads(done_file.read_text()).get("figures"),
                           f"{phase}: already done (delete {state_dir} to retrain)")
    check_requirements(phase, out)
    if state_dir.exists() and any(state_dir.iterdir()) and not resume:
        raise ValueError(f"{state_dir} holds an unfinished run; pass --resume to continue it, or choose another --out")
    state_dir.mkdir(parents=True, exist_ok=True)
    check_same_config(state_dir / "config.json", _phase_settings(cfg, phase), phase)
    _use_device(control.device)
    log = JsonlLog(out / "logs" / f"{phase}.jsonl")
    t0 = time.time()
    phase_cfg: Any
    figures: dict[str, Any] | None = None
    try:
        if phase == "tokenizer":
            phase_cfg = cfg.tokenizer
            path = train_tokenizer(out, cfg.tokenizer, log)
        elif phase == "image-vae":
            phase_cfg = _phase_config(cfg, phase)
            path = train_image_vae(out, phase_cfg, log, control)
        elif phase not in _GENERATOR_PHASES:
            phase_cfg = None if phase == "manifests" else _phase_config(cfg, phase)
            path, figures = _run_model_phase(phase, out, cfg, log, control)
        else:
            phase_cfg = _phase_config(cfg, phase)
            trainer, evaluator = _GENERATOR_PHASES[phase]
            path = trainer(out, phase_cfg, log, control)
            c = phase_cfg
            figures = evaluator(path, c.final_eval_prompts, c.seed + 2000, c.sample_steps, c.guidance_scale,
                                device=control.device)
            log.write(stage="final", event="eval", prompts_per_split=c.final_eval_prompts, **figures)
    except Stop as e:
        return PhaseResult(phase, "stopped", None, None, str(e))
    summary = {"phase": phase, "path": str(path), "figures": figures, "config": _phase_settings(cfg, phase),
               "seconds_this_run": round(time.time() - t0, 1), "machine": _machine(control.device)}
    if phase in _GENERATOR_PHASES:
        batch = {"vae": phase_cfg.vae_batch_size, "unet": phase_cfg.batch_size}
        summary["speed"] = {stage: {"median_steps_per_s": _median_rate(log, stage), "batch_size": size}
                            for stage, size in batch.items()}
        summary["size_bytes"] = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
        summary["evaluation"] = _EVALUATION_NOTES.get(phase) or _video_generator().EVALUATION_NOTE
        vae_records = [r for r in log.records() if r.get("event") == "latents"]
        if vae_records:
            summary["vae_reconstruction"] = vae_records[-1].get("reconstruction")
        evals = [r for r in log.records() if r.get("event") == "eval" and r.get("stage") in ("unet", "vocoder")]
        summary["during_training"] = [{k: v for k, v in r.items() if k not in ("time", "event")} for r in evals]
    elif phase in ("encoder", "llm"):
        summary["speed"] = {phase: {"median_steps_per_s": _median_rate(log, phase), "batch_size": phase_cfg.batch_size}}
    if phase in ("encoder", "llm", "stages"):
        summary["size_bytes"] = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    if phase == "stages":
        summary["stages"] = [{k: v for k, v in r.items() if k != "time"} for r in log.records()
                             if r.get("event") == "done"]
        summary["evaluation"] = ("anymodal eval (anymodal.toyworld.evaluate) on out/final: held-out toy-world "
                                 "prompts per direction, scored by the analytic checkers")
    atomic_write_text(done_file, json.dumps(summary, indent=2) + "\n")
    if results_dir is not None and figures is not None:
        atomic_write_text(results_dir / f"toyworld-{phase}.json", json.dumps(summary, indent=2) + "\n")
    return PhaseResult(phase, "done", str(path), figures, f"{phase}: done in {time.time() - t0:.0f} s -> {path}")


def train(out: str | os.PathLike = "runs/toyworld", phases: Sequence[str] | None = None,
          config: ToyworldTrainConfig | str = "default", max_minutes: float | None = None, resume: bool = False,
          results_dir: str | os.PathLike | None = "bench/results", progress: bool = True,
          stop_at_step: int | None = None, overrides: Sequence[str] = (), jobs: int = 1,
          threads: int | None = None, device: str | None = "cpu",
          share_idle_cores: bool = True) -> list[PhaseResult]:
    """Train the requested phases (default: all, in order) into ``out``.

    ``jobs`` > 1 runs up to that many phases at once, each in its own process, as soon as the
    phases it reads from (``REQUIRES``) have finished: on two cores, ``jobs=2`` trains the image
    generator beside the audio generator, the encoder and the LLM. ``threads`` sets each
    process's torch threads. With ``share_idle_cores`` (the default) and ``threads`` given, the
    ``jobs * threads`` threads are shared among the phases running at the moment: when a phase ends
    and nothing can start in its place, the others take its threads (between two steps; a phase
    that starts later takes them back), and the stages, which always run alone, start with all of
    them. Thread counts change floating-point rounding, so such a run's weights depend on when
    phases ended; ``share_idle_cores=False`` keeps every phase at ``threads`` for weights that
    repeat bit for bit from run to run.

    ``device`` is where every phase trains and evaluates: ``"cpu"`` (the default, and the timed
    recipe), ``"cuda"``/``"cuda:N"``, or ``"auto"`` (a CUDA GPU when torch sees one). Models are
    built and the phases' random draws made on the CPU, so a run starts from the same weights and
    batches on every device; results still differ between devices, by floating-point rounding and
    by the dropout masks of the text encoders (drawn on the device). A run may be resumed on
    another device (checkpoints load onto whichever device resumes them).

    ``max_minutes`` bounds this invocation's wall time: the running phase checkpoints and stops,
    and a later call with ``resume=True`` carries on. ``overrides`` are ``section.field=value``
    strings (see :meth:`ToyworldTrainConfig.with_overrides`); a resumed run must use the same
    ones. ``stop_at_step`` (for tests) stops every training loop of the current phase once it
    reaches that step.
    """
    cfg = ToyworldTrainConfig.preset(config) if isinstance(config, str) else config
    cfg = cfg.with_overrides(overrides)
    order = list(PHASES) if not phases else list(dict.fromkeys(phases))
    for p in order:
        if p not in PHASES:
            raise ValueError(f"unknown phase {p!r}; expected one of: {', '.join(PHASES)}")
    if max_minutes is not None and max_minutes <= 0:
        raise ValueError(f"max_minutes must be positive, got {max_minutes!r}")
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise ValueError(f"jobs must be an int >= 1, got {jobs!r}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be an int >= 1, got {threads!r}")
    control = RunControl(None if max_minutes is None else time.time() + 60.0 * max_minutes, stop_at_step, progress,
                         resolve_device(device))
    out_path = Path(out)
    results_path = None if results_dir is None else Path(results_dir)
    if jobs > 1 and len(order) > 1:
        return _train_parallel(sorted(order, key=PHASES.index), out_path, cfg, control, results_path, resume, jobs,
                               threads, share_idle_cores)
    if threads is not None:
        torch.set_num_threads(threads)
    results: list[PhaseResult] = []
    for p in sorted(order, key=PHASES.index):
        result = run_phase(p, out_path, cfg, control, results_path, resume)
        results.append(result)
        if result.status == "stopped":
            break
    return results


def _phase_worker(threads: int | None, share: Path | None, phase: str, out: Path, cfg: ToyworldTrainConfig,
                  control: RunControl, *args: Any) -> PhaseResult:
    """One phase in a worker process (spawned: a fresh interpreter, its own torch threads), following
    the scheduler's thread shares when ``share`` names its file."""
    if threads is not None:
        torch.set_num_threads(threads)
    if share is not None:
        control = replace(control, threads=ThreadShare(share, phase, current=threads))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return run_phase(phase, out, cfg, control, *args)


def _train_parallel(order: list[str], out: Path, cfg: ToyworldTrainConfig, control: RunControl,
                    results_dir: Path | None, resume: bool, jobs: int, threads: int | None,
                    share_idle_cores: bool = True) -> list[PhaseResult]:
    """Run ``order`` with up to ``jobs`` phases at once, each starting once the phases of ``order``
    it requires have finished. A stopped phase (``max_minutes``) starts nothing new; a failed one
    cancels what has not started and re-raises once the running phases have ended. With
    ``share_idle_cores`` and ``threads``, ``jobs * threads`` threads are split among the running
    phases (:class:`ThreadShare`) each time the set of running phases changes."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait

    pending = list(order)
    finished: set[str] = set()
    results: dict[str, PhaseResult] = {}
    running: dict[Future, str] = {}
    error: BaseException | None = None
    stopped = False
    share = out / "state" / "threads.json" if share_idle_cores and threads is not None else None
    written: dict[str, int] | None = None
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        while True:
            starting: list[str] = []
            if error is None and not stopped:
                for p in [p for p in pending if all(r in finished or r not in order for r in REQUIRES[p])]:
                    if len(running) + len(starting) >= jobs:
                        break
                    pending.remove(p)
                    starting.append(p)
            shares = {p: threads for p in starting}
            if share is not None and (running or starting):
                shares = ThreadShare.split(jobs * threads, [*running.values(), *starting])
                if shares != written:  # a phase ended with nothing to start in its place, or one starts
                    share.parent.mkdir(parents=True, exist_ok=True)
                    atomic_write_text(share, json.dumps(shares) + "\n")
                    written = shares
            for p in starting:
                running[pool.submit(_phase_worker, shares[p], share, p, out, cfg, control, results_dir, resume)] = p
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                p = running.pop(fut)
                try:
                    results[p] = fut.result()
                except BaseException as e:  # noqa: BLE001 - re-raised below, after the running phases end
                    error = error or e
                    continue
                if results[p].status == "stopped":
                    stopped = True
                else:
                    finished.add(p)
    if error is not None:
        raise error
    return [results[p] for p in order if p in results]


__all__ = ["AudioGeneratorPhase", "DiffusionRecipe", "EMA", "caption_aux_loss", "check_same_config",
           "eval_with_ema", "text_config_kwargs", "ImageGeneratorPhase", "JsonlLog", "OUTPUTS", "PHASES", "PRESETS", "PhaseResult", "REQUIRES",
           "RunControl", "TokenizerPhase", "ToyworldTrainConfig", "atomic_dir", "atomic_save", "build_tokenizer",
           "check_requirements", "cosine_lr", "device_of", "evaluate_image_generator", "evaluate_image_pipeline",
           "load_tokenizer", "resolve_device", "run_phase", "score_images", "train", "train_image_generator", "train_image_vae", "train_loop",
           "world_texts"]
