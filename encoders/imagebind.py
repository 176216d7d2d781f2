"""ImageBind (Girdhar et al., "ImageBind: One Embedding Space To Bind Them All", CVPR 2023).

Our own implementation of the architecture that NExT-GPT uses as its input encoder. One
model embeds image, video, audio (and text) into a shared space; each modality has its own
preprocessor (patch stem + positional embedding + CLS token), transformer trunk, head
(final LayerNorm, CLS token, linear projection) and postprocessor (L2 normalisation, plus a
logit scale for audio and text). Image and video share the vision branch: an image is
repeated to a two-frame clip, a video is cut into two-frame clips embedded one by one and
averaged, as in the official model.

Parameter names follow the official ``imagebind_huge.pth`` (``modality_preprocessors.vision.
rgbt_stem.proj.1.weight``, ``modality_trunks.audio.blocks.0.attn.bias_k``, ...), so the
official checkpoint loads with strict key matching into the branches that were built.

Licence: this code is anymodal's own. The official ImageBind weights are released by Meta
under CC BY-NC-SA 4.0 (non-commercial, share-alike); loading them here does not change that,
and anything built on them inherits it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from anymodal.checks import positive_int
from anymodal.modality import Modality
from anymodal.registry import register_encoder

from .base import ModalityEncoder
from .preprocess import (AUDIO_CHANNELS, AUDIO_DEMEAN, VIDEO_CROPS, VIDEO_SAMPLING, preprocess_audio,
                         preprocess_images, preprocess_videos)

OUTPUTS = ("embedding", "tokens")
STAGES = ("modality_preprocessors", "modality_trunks", "modality_heads", "modality_postprocessors")

# anymodal modality -> official branch key. Video has no branch of its own: it is vision.
BRANCHES = {Modality.IMAGE: "vision", Modality.VIDEO: "vision", Modality.AUDIO: "audio", Modality.TEXT: "text"}

# Logit scales of the official postprocessors (text learnable, audio fixed).
_TEXT_LOGIT_SCALE = 1 / 0.07
_AUDIO_LOGIT_SCALE = 20.0
_MAX_LOGIT_SCALE = 100.0


# ============================================================================ options
@dataclass
class TrunkOptions:
    """Width, depth and heads of one modality's transformer trunk."""

    embed_dim: int
    depth: int
    num_heads: int
    drop_path: float = 0.0  # stochastic-depth rate of the last block (linear ramp from 0); training only

    def check(self, name: str) -> None:
        for f in ("embed_dim", "depth", "num_heads"):
            positive_int(f"{name}.{f}", getattr(self, f))
        if self.embed_dim % self.num_heads:
            raise ValueError(f"{name}.embed_dim ({self.embed_dim}) must be divisible by {name}.num_heads ({self.num_heads})")
        if not isinstance(self.drop_path, (int, float)) or isinstance(self.drop_path, bool) or not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"{name}.drop_path must be in [0, 1), got {self.drop_path!r}")


_TRUNKS = ("vision", "audio", "text")


@dataclass
class ImageBindOptions:
    """The architecture of an :class:`ImageBindEncoder`. Defaults are the official ``imagebind_huge``.

    ``output`` selects what :meth:`ImageBindEncoder.forward` returns: ``"embedding"`` is the
    official model's output (the pooled, L2-normalised and, for audio and text, logit-scaled
    embedding; one token of ``out_embed_dim``), which is what NExT-GPT projects; ``"tokens"``
    is the final-LayerNorm'd trunk sequence (CLS + patches) of width ``<branch>.embed_dim``,
    concatenated over clips for audio and over clips and crops (views) for video.
    """

    output: str = "embedding"
    out_embed_dim: int = 1024
    vision: TrunkOptions = field(default_factory=lambda: TrunkOptions(1280, 32, 16))
    audio: TrunkOptions = field(default_factory=lambda: TrunkOptions(768, 12, 12, drop_path=0.1))
    text: TrunkOptions = field(default_factory=lambda: TrunkOptions(1024, 24, 16))
    mlp_ratio: int = 4
    # vision (image and video)
    image_size: int = 224
    patch_size: int = 14
    video_frames: int = 2  # frames per clip; also the temporal size of the stem's 3D patches
    video_clips: int = 5  # clips sampled per video; the embeddings of all clips and crops are averaged
    video_crops: int = 3  # spatial crops per clip: 3 (official: left, centre, right) or 1 (centre)
    # "windows" (official): clips of video_clip_duration seconds spread over the video by its frame
    # rate; "segments": video_clips equal segments of the frames, ignoring time (the toy world's choice).
    video_sampling: str = "windows"
    video_clip_duration: float = 2.0
    video_assumed_fps: float = 8.0  # rate of a video that carries none (bare frames); anymodal writes 8 fps
    # audio
    num_mel_bins: int = 128
    audio_target_len: int = 204  # fbank frames per clip (10 ms hop: about 2 s)
    audio_patch_size: int = 16
    audio_patch_stride: int = 10
    audio_sample_rate: int = 16000
    audio_clip_duration: float = 2.0
    audio_clips: int = 3
    audio_channel: str = "first"  # of a multi-channel input: "first" (official) or "mean"
    # "in_place" (official): each clip's mean is subtracted from the shared waveform, which overlapping
    # clips (inputs under audio_clips x audio_clip_duration) then see; "per_clip": from a copy of each clip.
    audio_demean: str = "in_place"
    # The official audio postprocessor multiplies the normalised embedding by 20. NExT-GPT's copy
    # skips that step (it calls only the Normalize), so its llama_proj expects unscaled features.
    audio_logit_scale: bool = True
    # text (token ids from CLIP's BPE tokenizer)
    text_context_length: int = 77
    text_vocab_size: int = 49408

    def __post_init__(self) -> None:
        for name in _TRUNKS:
            value = getattr(self, name)
            if isinstance(value, dict):
                value = _trunk_from_dict(name, value)
                setattr(self, name, value)
            if not isinstance(value, TrunkOptions):
                raise ValueError(f"{name} must be a mapping with embed_dim, depth, num_heads, drop_path; got {value!r}")
            value.check(name)
        if self.output not in OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(OUTPUTS)}, got {self.output!r}")
        for name in ("out_embed_dim", "mlp_ratio", "image_size", "patch_size", "video_frames", "video_clips",
                     "num_mel_bins", "audio_target_len", "audio_patch_size", "audio_patch_stride",
                     "audio_sample_rate", "audio_clips", "text_context_length", "text_vocab_size"):
            positive_int(name, getattr(self, name))
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        if self.audio_patch_size > min(self.num_mel_bins, self.audio_target_len):
            raise ValueError(f"audio_patch_size ({self.audio_patch_size}) must not exceed num_mel_bins "
                             f"({self.num_mel_bins}) or audio_target_len ({self.audio_target_len})")
        for name in ("audio_clip_duration", "video_clip_duration", "video_assumed_fps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
            setattr(self, name, float(value))
        for name, allowed in (("video_crops", VIDEO_CROPS), ("video_sampling", VIDEO_SAMPLING),
                              ("audio_channel", AUDIO_CHANNELS), ("audio_demean", AUDIO_DEMEAN)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {getattr(self, name)!r}")
        if not isinstance(self.audio_logit_scale, bool):
            raise ValueError(f"audio_logit_scale must be true or false, got {self.audio_logit_scale!r}")

    # -- derived sizes
    @property
    def vision_tokens(self) -> int:
        """Tokens per image or video clip: CLS + one per (video_frames x patch x patch) tube."""
        return 1 + (self.image_size // self.patch_size) ** 2

    @property
    def video_views(self) -> int:
        """Views per video, each embedded on its own and averaged: clips x spatial crops."""
        return self.video_clips * self.video_crops

    @property
    def audio_grid(self) -> tuple[int, int]:
        k, s = self.audio_patch_size, self.audio_patch_stride
        return (self.num_mel_bins - k) // s + 1, (self.audio_target_len - k) // s + 1

    @property
    def audio_tokens(self) -> int:
        """Tokens per audio clip: CLS + the conv grid over (mel, frames)."""
        h, w = self.audio_grid
        return 1 + h * w

    # -- dict round trip
    @classmethod
    def from_dict(cls, options: dict[str, Any] | None) -> "ImageBindOptions":
        """Build from a YAML ``options`` dict: ``{"preset": "huge"}``, explicit fields, or a preset plus overrides.

        Trunk overrides merge into the preset's trunk, e.g. ``{"preset": "huge", "audio": {"drop_path": 0.0}}``.
        Without a preset the defaults are ``huge``.
        """
        data = dict(options or {})
        preset = data.pop("preset", None)
        if preset is None:
            base: dict[str, Any] = {}
        elif preset in PRESETS:
            base = copy.deepcopy(PRESETS[preset])
        else:
            raise ValueError(f"imagebind options.preset: unknown preset {preset!r}; available: {', '.join(sorted(PRESETS))}")
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ValueError(f"imagebind options: unknown field {unknown[0]!r}; allowed: preset, {', '.join(sorted(allowed))}")
        for name in _TRUNKS:
            if name in data:
                if isinstance(data[name], TrunkOptions):
                    data[name] = dataclasses.asdict(data[name])
                if not isinstance(data[name], dict):
                    raise ValueError(f"imagebind options.{name} must be a mapping, got {type(data[name]).__name__}")
                default = dataclasses.asdict(getattr(cls(), name)) if name not in base else {}
                data[name] = {**default, **base.get(name, {}), **data[name]}
        return cls(**{**base, **data})

    def to_dict(self) -> dict[str, Any]:
        """Every field, explicitly (no preset), so the dict rebuilds this exact architecture."""
        return dataclasses.asdict(self)


def _trunk_from_dict(name: str, value: dict[str, Any]) -> TrunkOptions:
    allowed = {f.name for f in dataclasses.fields(TrunkOptions)}
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise ValueError(f"{name}: unknown field {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}")
    missing = sorted(f for f in ("embed_dim", "depth", "num_heads") if f not in value)
    if missing:
        raise ValueError(f"{name}: missing field {missing[0]!r}")
    return TrunkOptions(**value)


PRESETS: dict[str, dict[str, Any]] = {
    # The official imagebind_huge (vision ViT-H/14, audio ViT-B, text ViT-H), 1024-d joint space.
    "huge": {},
    # For tests: every branch real but small. Audio keeps the official 128 x 204 fbank (229 tokens per clip).
    "tiny": {
        "out_embed_dim": 32,
        "vision": {"embed_dim": 32, "depth": 2, "num_heads": 2},
        "audio": {"embed_dim": 32, "depth": 2, "num_heads": 2, "drop_path": 0.1},
        "text": {"embed_dim": 32, "depth": 2, "num_heads": 2},
        "image_size": 32,
        "patch_size": 8,
        "video_clips": 2,
        "audio_clips": 2,
        "text_vocab_size": 49408,
    },
}


def list_presets() -> list[str]:
    return sorted(PRESETS)


# ============================================================================ building blocks
class PadIm2Video(nn.Module):
    """``(B, C, H, W)`` or single-frame ``(B, C, 1, H, W)`` -> a clip of ``frames`` repeated frames."""

    def __init__(self, frames: int):
        super().__init__()
        self.frames = frames

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            x = x.unsqueeze(2)
        if x.shape[2] == 1:
            x = x.expand(-1, -1, self.frames, -1, -1)
        return x


class PatchStem(nn.Module):
    """A convolutional patchifier, flattened to tokens, with an optional LayerNorm (official ``PatchEmbedGeneric``)."""

    def __init__(self, proj: nn.Module, norm_layer: nn.Module | None = None):
        super().__init__()
        self.proj = proj
        self.norm_layer = norm_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x).flatten(2).transpose(1, 2)  # (B, D, [T,] H, W) -> (B, N, D)
        return self.norm_layer(x) if self.norm_layer is not None else x


class PosEmbedding(nn.Module):
    """Holds the learnable positional embedding (official ``pos_embedding_helper``)."""

    def __init__(self, num_tokens: int, dim: int):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.empty(1, num_tokens, dim))
        nn.init.normal_(self.pos_embed, std=dim ** -0.5)


class PatchPreprocessor(nn.Module):
    """Patch stem + CLS token + positional embedding, for vision (RGB clips) and audio (fbank "images")."""

    def __init__(self, stem: PatchStem, num_tokens: int, dim: int):
        super().__init__()
        self.rgbt_stem = stem  # the official name, used for audio too
        self.pos_embedding_helper = PosEmbedding(num_tokens, dim)
        self.cls_token = nn.Parameter(torch.empty(1, 1, dim))
        nn.init.normal_(self.cls_token, std=dim ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.rgbt_stem(x)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        return tokens + self.pos_embedding_helper.pos_embed


class TextPreprocessor(nn.Module):
    """Token + positional embeddings, and the causal mask the text trunk uses."""

    def __init__(self, vocab_size: int, context_length: int, dim: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Parameter(torch.empty(1, context_length, dim))
        # Persistent, because the official checkpoint stores it.
        self.register_buffer("mask", torch.full((context_length, context_length), float("-inf")).triu_(1))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(ids) + self.pos_embed


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch for whole samples while training."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Per sample. (The official trunk runs sequence-first, so its timm DropPath drops per position.)
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """A pre-LN transformer block: ``x + attn(norm_1(x))``, then ``x + mlp(norm_2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int, drop_path: float, add_bias_kv: bool):
        super().__init__()
        # nn.MultiheadAttention gives the official parameter names (in_proj_weight, out_proj, bias_k/bias_v).
        self.attn = nn.MultiheadAttention(dim, num_heads, bias=True, add_bias_kv=add_bias_kv, batch_first=True)
        self.drop_path = DropPath(drop_path)
        self.norm_1 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(mlp_ratio * dim))
        self.norm_2 = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm_1(x)
        x = x + self.drop_path(self.attn(h, h, h, need_weights=False, attn_mask=attn_mask)[0])
        return x + self.drop_path(self.mlp(self.norm_2(x)))


class Trunk(nn.Module):
    """A stack of :class:`Block` with an optional LayerNorm in front (the vision trunk has one)."""

    def __init__(self, opts: TrunkOptions, mlp_ratio: int, pre_norm: bool, add_bias_kv: bool):
        super().__init__()
        self.pre_transformer_layer = nn.Sequential(nn.LayerNorm(opts.embed_dim, eps=1e-6) if pre_norm else nn.Identity())
        rates = torch.linspace(0, opts.drop_path, opts.depth, device="cpu").tolist()
        self.blocks = nn.Sequential(*[Block(opts.embed_dim, opts.num_heads, mlp_ratio, r, add_bias_kv) for r in rates])
        self.apply(_init_trunk_weights)

    def forward(self, tokens: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.pre_transformer_layer(tokens)
        for block in self.blocks:
            x = block(x, attn_mask)
        return x


def _init_trunk_weights(m: nn.Module) -> None:
    # As the official trunk (the MAE/JAX ViT recipe): xavier-uniform linears, zero biases.
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class SelectElement(nn.Module):
    """Pick one token (the CLS token at index 0) from ``(B, L, D)``."""

    def __init__(self, index: int):
        super().__init__()
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.index]


class SelectEOSAndProject(nn.Module):
    """Text pooling as in CLIP: the state at the end-of-text token (the largest id), then ``proj``."""

    def __init__(self, proj: nn.Module):
        super().__init__()
        self.proj = proj

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(x[torch.arange(x.shape[0], device=x.device), ids.argmax(dim=-1)])


class Normalize(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(x, dim=-1, p=2)


class LogitScale(nn.Module):
    """Multiply by ``exp(log_logit_scale)``, capped at 100 (official ``LearnableLogitScaling``)."""

    def __init__(self, init: float, learnable: bool):
        super().__init__()
        value = torch.tensor(math.log(init))
        if learnable:
            self.log_logit_scale = nn.Parameter(value)
        else:
            self.register_buffer("log_logit_scale", value)  # persistent: the official checkpoint has it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(self.log_logit_scale.exp(), max=_MAX_LOGIT_SCALE) * x


def _pooled_head(dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim, eps=1e-6), SelectElement(0), nn.Linear(dim, out_dim, bias=False))


# ============================================================================ the encoder
@register_encoder("imagebind")
class ImageBindEncoder(ModalityEncoder):
    """ImageBind serving image, video and audio (and text, from token ids) with one model.

    Only the branches of the requested modalities are built (image and video share ``vision``).
    Build with :meth:`from_config` (``options`` as in :class:`ImageBindOptions`, ``pretrained``
    a local ``imagebind_huge.pth`` or ``.safetensors``) or :meth:`from_pretrained`.

    Inputs to :meth:`forward`, as :meth:`preprocess` makes them: image ``(B, 3, S, S)``;
    video ``(B, video_clips * video_crops, 3, video_frames, S, S)`` (clip by clip, crops inside
    each; ``(B, 3, clips * video_frames, S, S)``, one view per clip, is accepted too); audio
    ``(B, audio_clips, 1, num_mel_bins, audio_target_len)``; text ``(B, text_context_length)``
    int64 ids.
    """

    type_name = "imagebind"

    def __init__(self, options: ImageBindOptions, modalities: Sequence[Modality | str]):
        super().__init__(modalities)
        self.opts = options
        o = options
        self.branches = tuple(dict.fromkeys(BRANCHES[m] for m in self.modalities))  # ordered, deduplicated
        pre, trunks, heads, post = {}, {}, {}, {}
        if "vision" in self.branches:
            k = (o.video_frames, o.patch_size, o.patch_size)
            conv = nn.Conv3d(3, o.vision.embed_dim, kernel_size=k, stride=k, bias=False)
            pre["vision"] = PatchPreprocessor(PatchStem(nn.Sequential(PadIm2Video(o.video_frames), conv)),
                                              o.vision_tokens, o.vision.embed_dim)
            trunks["vision"] = Trunk(o.vision, o.mlp_ratio, pre_norm=True, add_bias_kv=False)
            heads["vision"] = _pooled_head(o.vision.embed_dim, o.out_embed_dim)
            post["vision"] = Normalize()
        if "audio" in self.branches:
            d = o.audio.embed_dim
            conv = nn.Conv2d(1, d, kernel_size=o.audio_patch_size, stride=o.audio_patch_stride, bias=False)
            pre["audio"] = PatchPreprocessor(PatchStem(conv, nn.LayerNorm(d)), o.audio_tokens, d)
            trunks["audio"] = Trunk(o.audio, o.mlp_ratio, pre_norm=False, add_bias_kv=True)
            heads["audio"] = _pooled_head(d, o.out_embed_dim)
            post["audio"] = nn.Sequential(Normalize(), LogitScale(_AUDIO_LOGIT_SCALE, learnable=False))
        if "text" in self.branches:
            d = o.text.embed_dim
            pre["text"] = TextPreprocessor(o.text_vocab_size, o.text_context_length, d)
            trunks["text"] = Trunk(o.text, o.mlp_ratio, pre_norm=False, add_bias_kv=False)
            heads["text"] = SelectEOSAndProject(nn.Sequential(nn.LayerNorm(d, eps=1e-6), nn.Linear(d, o.out_embed_dim, bias=False)))
            post["text"] = nn.Sequential(Normalize(), LogitScale(_TEXT_LOGIT_SCALE, learnable=True))
        self.modality_preprocessors = nn.ModuleDict(pre)
        self.modality_trunks = nn.ModuleDict(trunks)
        self.modality_heads = nn.ModuleDict(heads)
        self.modality_postprocessors = nn.ModuleDict(post)

    # ------------------------------------------------------------------ interface
    def feature_shape(self, modality: Modality | str) -> tuple[int, int]:
        m = self.check_modality(modality)
        o = self.opts
        if o.output == "embedding":
            return (1, o.out_embed_dim)
        if m is Modality.IMAGE:
            return (o.vision_tokens, o.vision.embed_dim)
        if m is Modality.VIDEO:
            return (o.video_views * o.vision_tokens, o.vision.embed_dim)
        if m is Modality.AUDIO:
            return (o.audio_clips * o.audio_tokens, o.audio.embed_dim)
        return (o.text_context_length, o.text.embed_dim)

    def preprocess(self, modality: Modality | str, items: Sequence[Any]) -> torch.Tensor:
        m = self.check_modality(modality)
        o = self.opts
        if m is Modality.IMAGE:
            return preprocess_images(items, size=o.image_size)
        if m is Modality.VIDEO:
            return preprocess_videos(items, frames_per_clip=o.video_frames, num_clips=o.video_clips,
                                     size=o.image_size, crops=o.video_crops, sampling=o.video_sampling,
                                     clip_duration=o.video_clip_duration, assumed_fps=o.video_assumed_fps)
        if m is Modality.AUDIO:
            return preprocess_audio(items, sample_rate=o.audio_sample_rate, num_mel_bins=o.num_mel_bins,
                                    target_length=o.audio_target_len, clip_duration=o.audio_clip_duration,
                                    num_clips=o.audio_clips, channel=o.audio_channel, demean=o.audio_demean)
        return self._token_ids(items)

    def forward(self, modality: Modality | str, inputs: torch.Tensor) -> torch.Tensor:
        """Encode a preprocessed batch to ``(B, T, D)``; see :meth:`feature_shape` for ``T`` and ``D``."""
        m = self.check_modality(modality)
        branch = BRANCHES[m]
        ref = self.modality_trunks[branch].blocks[0].norm_1.weight
        if m is Modality.TEXT:
            x = self._check_text(inputs).to(ref.device)
            batch, clips = x.shape[0], 1
        else:
            x = inputs.to(device=ref.device, dtype=ref.dtype)
            x, batch, clips = self._to_clips(m, x)

        tokens = self.modality_preprocessors[branch](x)
        mask = self.modality_preprocessors["text"].mask if branch == "text" else None
        tokens = self.modality_trunks[branch](tokens, attn_mask=mask)
        head = self.modality_heads[branch]

        if self.opts.output == "tokens":
            final_norm = head.proj[0] if branch == "text" else head[0]
            tokens = final_norm(tokens)
            return tokens.reshape(batch, clips * tokens.shape[1], tokens.shape[2])
        emb = head(tokens, x) if branch == "text" else head(tokens)
        post = self.modality_postprocessors[branch]
        emb = post[0](emb) if branch == "audio" and not self.opts.audio_logit_scale else post(emb)
        # Audio and video: the official model averages the (normalised, scaled) embeddings of all
        # clips (and, for video, spatial crops).
        return emb.reshape(batch, clips, -1).mean(dim=1, keepdim=True)

    def options(self) -> dict[str, Any]:
        return self.opts.to_dict()

    @classmethod
    def from_config(cls, options: dict[str, Any] | ImageBindOptions | None, modalities: Sequence[Modality | str],
                    pretrained: str | os.PathLike | None = None) -> "ImageBindEncoder":
        """Build the branches for ``modalities``; load ``pretrained`` (``.pth`` or ``.safetensors``) strictly.

        Checkpoint keys of branches not built (the official file also has depth, thermal and
        IMU) are skipped; any other missing, unexpected or mis-shaped key raises ``ValueError``
        listing them. The encoder is returned in eval mode, in float32 on the CPU.
        """
        opts = options if isinstance(options, ImageBindOptions) else ImageBindOptions.from_dict(options)
        if pretrained is None:
            return cls(opts, modalities).eval()
        with torch.device("meta"):  # no memory for weights about to be replaced
            enc = cls(opts, modalities)
        state = enc._read_checkpoint(pretrained)
        enc.load_state_dict(state, strict=True, assign=True)
        return enc.eval()

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def check_checkpoint(cls, options: dict[str, Any] | ImageBindOptions | None, modalities: Sequence[Modality | str],
                         path: str | os.PathLike) -> None:
        """Raise ``ValueError`` unless ``path`` fits these options, reading only the tensors' shapes (a
        converter checks a multi-GB file this way without loading it)."""
        opts = options if isinstance(options, ImageBindOptions) else ImageBindOptions.from_dict(options)
        with torch.device("meta"):
            enc = cls(opts, modalities)
        enc._check_shapes(path, {k: tuple(v.shape) for k, v in enc._open_checkpoint(path).items()})

    def _open_checkpoint(self, path: str | os.PathLike) -> dict[str, Any]:
        """The checkpoint's entries for the built branches: tensors (memory-mapped where the format
        allows) or, for safetensors, lazy slices that read nothing until asked."""
        path = Path(path)
        if not path.is_file():
            hint = " (a directory written by save_pretrained loads with from_pretrained)" if path.is_dir() else ""
            raise FileNotFoundError(f"ImageBind checkpoint not found: {path}{hint}")

        def wanted(key: str) -> bool:
            # Keys of branches we did not build are expected in the official file: skip them.
            parts = key.split(".")
            return not (len(parts) > 2 and parts[0] in STAGES and parts[1] not in self.branches)

        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {k: _Lazy(path, k, tuple(f.get_slice(k).get_shape())) for k in f.keys() if wanted(k)}
        try:
            # mmap: only the built branches are read from a multi-GB file.
            raw = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) files cannot be mmapped
            raw = torch.load(str(path), map_location="cpu", weights_only=True)
        if isinstance(raw, dict) and "model" in raw and isinstance(raw["model"], dict):
            raw = raw["model"]
        if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
            raise ValueError(f"{path}: not a state dict (expected a mapping of parameter names to tensors)")
        return {k: v for k, v in raw.items() if wanted(k)}

    def _check_shapes(self, path: str | os.PathLike, shapes: dict[str, tuple[int, ...]]) -> None:
        own = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        missing = sorted(set(own) - set(shapes))
        unexpected = sorted(set(shapes) - set(own))
        mismatched = [f"{k}: checkpoint {shapes[k]} vs model {own[k]}"
                      for k in sorted(set(own) & set(shapes)) if shapes[k] != own[k]]
        if missing or unexpected or mismatched:
            parts = [f"{len(keys)} {what}: {_preview(keys)}" for what, keys in
                     (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)) if keys]
            raise ValueError(f"checkpoint {path} does not match ImageBind branches {', '.join(self.branches)} "
                             f"with options {self.opts.to_dict()}: " + "; ".join(parts))

    def _read_checkpoint(self, path: str | os.PathLike) -> dict[str, torch.Tensor]:
        """The checkpoint's tensors for the built branches, as float32 CPU copies, checked against this model."""
        entries = self._open_checkpoint(path)
        self._check_shapes(path, {k: tuple(v.shape) for k, v in entries.items()})
        state = {k: v.load() if isinstance(v, _Lazy) else v for k, v in entries.items()}
        return {k: v.to(torch.float32, copy=True) if v.is_floating_point() else v.clone() for k, v in state.items()}

    # ------------------------------------------------------------------ input checks
    def _to_clips(self, m: Modality, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """Reshape a preprocessed batch to one clip per row; return it with the batch and clip counts."""
        o = self.opts
        s = o.image_size
        if m is Modality.IMAGE:
            if x.ndim != 4 or tuple(x.shape[1:]) != (3, s, s):
                raise ValueError(f"imagebind image input must be (batch, 3, {s}, {s}), got {tuple(x.shape)}")
            return x, x.shape[0], 1
        if m is Modality.VIDEO:
            f = o.video_frames
            if x.ndim == 6 and tuple(x.shape[2:]) == (3, f, s, s):  # (batch, views, 3, frames, S, S): as preprocess
                b, views = x.shape[:2]
                return x.reshape(b * views, 3, f, s, s), b, views
            if x.ndim != 5 or x.shape[1] != 3 or tuple(x.shape[3:]) != (s, s) or x.shape[2] % f:
                raise ValueError(f"imagebind video input must be (batch, views, 3, {f}, {s}, {s}) as preprocess makes "
                                 f"it, or (batch, 3, frames, {s}, {s}) with frames a multiple of video_frames={f} "
                                 f"(one view per clip), got {tuple(x.shape)}")
            b, c, t = x.shape[:3]
            clips = t // f
            x = x.reshape(b, c, clips, f, s, s).transpose(1, 2).reshape(b * clips, c, f, s, s)
            return x, b, clips
        shape = (1, o.num_mel_bins, o.audio_target_len)
        if x.ndim == 4:  # a single clip per item
            x = x.unsqueeze(1)
        if x.ndim != 5 or tuple(x.shape[2:]) != shape:
            raise ValueError(f"imagebind audio input must be (batch, clips, {', '.join(map(str, shape))}), "
                             f"got {tuple(x.shape)}")
        b, clips = x.shape[:2]
        return x.reshape(b * clips, *shape), b, clips

    def _check_text(self, ids: torch.Tensor) -> torch.Tensor:
        n = self.opts.text_context_length
        if ids.ndim != 2 or ids.shape[1] != n or ids.is_floating_point():
            raise ValueError(f"imagebind text input must be integer token ids of shape (batch, {n}), got "
                             f"{ids.dtype} {tuple(ids.shape)}")
        return ids.long()

    def _token_ids(self, items: Sequence[Any]) -> torch.Tensor:
        """Pad (with 0) or reject token-id sequences; ImageBind's text branch takes CLIP BPE ids."""
        n = self.opts.text_context_length
        rows = []
        for i, item in enumerate(items):
            if isinstance(item, str):
                raise ValueError("imagebind text input must be token ids from CLIP's BPE tokenizer (start 49406, "
                                 "end 49407), e.g. from transformers.CLIPTokenizer; got a string")
            ids = torch.as_tensor(item).reshape(-1)
            if ids.is_floating_point() or ids.numel() == 0:
                raise ValueError(f"text item {i}: expected a non-empty sequence of integer token ids")
            if ids.numel() > n:
                raise ValueError(f"text item {i}: {ids.numel()} tokens exceed text_context_length={n}")
            if int(ids.min()) < 0 or int(ids.max()) >= self.opts.text_vocab_size:
                raise ValueError(f"text item {i}: token ids must lie in [0, {self.opts.text_vocab_size})")
            rows.append(nn.functional.pad(ids.long(), (0, n - ids.numel())))
        if not rows:
            raise ValueError("no text inputs given")
        return torch.stack(rows)


def _preview(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


class _Lazy:
    """A safetensors entry whose shape is known and whose data is read only by :meth:`load`."""

    def __init__(self, path: Path, key: str, shape: tuple[int, ...]):
        self.path, self.key, self.shape = path, key, shape

    def load(self) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt", device="cpu") as f:
            return f.get_tensor(self.key)
