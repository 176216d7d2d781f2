"""The toy world's recipe: every phase's settings, with their defaults and presets.

:class:`ToyworldTrainConfig` holds one section per phase (``preset("default")`` is what
``anymodal toyworld train`` runs, ``preset("smoke")`` a seconds-long version for tests) and takes
``section.field=value`` overrides. Each section validates itself in ``__post_init__``. Nothing
here trains anything: the phases' modules read these classes, never the other way round.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Sequence

from . import world


# The audio front end: a log-mel spectrogram of magnitudes (HTK mel bands without normalisation,
# the checkers' filterbank), n_fft 1024 and hop 256 at 16 kHz: 64 frames x 64 bands per clip.
# Features are (log(max(mel, 1e-5)) + MEL_SHIFT) / MEL_SCALE, about -1.4 (silence) to 1.4.
MEL_NFFT, MEL_HOP, MEL_BANDS = 1024, 256, 64
MEL_FRAMES = world.CLIP_SAMPLES // MEL_HOP
MEL_FLOOR, MEL_SHIFT, MEL_SCALE = 1e-5, 3.0, 6.0


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
    # Three blocks: 64x64x3 -> 16x16x8 (6x fewer numbers). 8 latent channels because 4 keep neither
    # colours nor corners in a short run (docs/toyworld.md). The world's images are flat colours with
    # sharp edges, which a narrow VAE reconstructs; no mid-block attention (nothing global to model).
    return {"in_channels": 3, "out_channels": 3, "latent_channels": 8,
            "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
            "block_out_channels": [8, 16, 32], "layers_per_block": 1, "norm_num_groups": 4,
            "sample_size": world.IMAGE_SIZE, "mid_block_add_attention": False}


def _default_unet() -> dict[str, Any]:
    # shared/ENVIRONMENT.md's recipe (channels 32/64/64, one layer per block, cross-attention width
    # 64, 8 norm groups) on the VAE's 16x16x8 latents, with attention at 8x8 only: 256-token
    # self-attention at 16x16 costs a third of a step and buys no held-out accuracy (docs/toyworld.md).
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
    # Extra images, as a fraction of bank_size, painted off the palette and captioned without a
    # colour ("a triangle at the top on a blue background"; image_generator.augmented_image_bank), so
    # that the shape word draws its shape whatever the colour, which held-out colour x shape pairs
    # need. No held-out pair is ever drawn, not even a near miss (the colours are >= 60 in RGB from
    # every palette colour and >= 120 from the colours the shape is held out with). 0 turns it off.
    augment_fraction: float = 0.25
    # Weight of an auxiliary loss: a linear head on the text encoder's mean-pooled hidden states
    # (what the UNet attends to) predicts the caption's colour, shape, size, position and
    # background (image_generator.AUX_FIELDS), as video_generator.text_aux_weight does for its
    # fields. 0 turns it off. At 0.1 position is learnt by step 1,000 instead of 3,500-5,500 (or
    # never), and the phase's held-out images are right 70-95% of the time against 37.5-55%, at two
    # seeds; with the image projector reading LLM layer 2, the pipeline composes it (held-out t2i
    # 83 / 93% against 33%; docs/toyworld.md, "Ninth session").
    text_aux_weight: float = 0.1
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
    image recipe. The vocoder (:class:`~anymodal.generators.vocoders.GriffinLimVocoder`) has no
    weights; it is scored on real mels first, which bounds the pipeline's pitch accuracy.
    """

    steps: int = 1600
    vocoder: dict[str, Any] = field(default_factory=_default_vocoder)
    # Weight of an auxiliary loss: a linear head on the pooled CLAP embedding predicts the
    # caption's note, waveform and duration, so that a from-scratch text tower gives the notes
    # apart embeddings the UNet can hear (without it they collapse onto one; docs/toyworld.md). It
    # stands in for real CLAP's contrastive text-audio pre-training; 0 turns it off.
    text_aux_weight: float = 0.1
    # Extra clips, as a fraction of bank_size, played off the world in one field and captioned
    # without it (see audio_generator.augmented_audio_bank): a world note with an off-world timbre
    # ("a low tone of e4 lasting one second") or a world waveform off the note grid ("a sawtooth tone
    # lasting one second"), so that the UNet learns pitch from the note word apart from the
    # waveform word, which held-out note x waveform pairs need. No held-out pair is ever played.
    # 0 turns it off, the default: at 0.5 (2,048 extra clips, 1,600 steps) held-out note rose from 32.5% to
    # 47.5% but seen note fell from 90% to 60% (docs/toyworld.md, "2026-12-07").
    augment_fraction: float = 0.0
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


VAE_SOURCES: tuple[str, ...] = ("image-generator", "train")


def _default_video_vae() -> dict[str, Any]:
    # Only used with vae_from="train": the image VAE's architecture on 32x32 frames (-> 8x8x8).
    return _default_vae() | {"sample_size": world.VIDEO_SIZE}


def _default_video_unet() -> dict[str, Any]:
    # 8x8x8 latents x 8 frames. Two levels (8x8, 4x4) plus UNet3D's mid block at 4x4; the
    # cross-attention (with temporal attention) only at 4x4 and in the mid block: at 8x8 it cost
    # twice as much per step. Channels 16/32 keep the UNet at 0.44 M parameters (1.8 MB), so the
    # whole pipeline stays near 2.5 MB. attention_head_dim is UNet3D's (mis-named) head count.
    return {"sample_size": world.VIDEO_SIZE // 4, "in_channels": 8, "out_channels": 8, "layers_per_block": 1,
            "block_out_channels": [16, 32], "down_block_types": ["DownBlock3D", "CrossAttnDownBlock3D"],
            "up_block_types": ["CrossAttnUpBlock3D", "UpBlock3D"], "cross_attention_dim": 32,
            "attention_head_dim": 4, "norm_num_groups": 8}


def _default_video_text_encoder() -> dict[str, Any]:
    # CLIPTextConfig; a video caption is at most 8 tokens with <s> and </s>.
    return {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
            "max_position_embeddings": 16}


@dataclass
class VideoGeneratorPhase(DiffusionRecipe):
    """The tiny text-to-video model (Zeroscope's layout): architecture and training recipe."""

    bank_size: int = 2048  # videos rendered once (8 frames each)
    prompt_length: int = 16
    batch_size: int = 16
    vae_from: str = "image-generator"  # "image-generator": reuse <out>/image-generator/vae; "train": train `vae`
    vae: dict[str, Any] = field(default_factory=_default_video_vae)  # only with vae_from="train"
    unet: dict[str, Any] = field(default_factory=_default_video_unet)
    text_encoder: dict[str, Any] = field(default_factory=_default_video_text_encoder)
    # Weight of an auxiliary loss: a linear head on the text encoder's mean-pooled hidden states
    # (what the UNet attends to) predicts the caption's colour, shape and direction, so that a
    # from-scratch text tower keeps the four directions apart (without it they collapse onto one
    # embedding and the videos move at random; docs/toyworld.md). A stand-in for a pre-trained text
    # encoder; 0 turns it off.
    text_aux_weight: float = 0.1

    def __post_init__(self) -> None:
        _check_recipe("video_generator", self)
        if self.vae_from not in VAE_SOURCES:
            raise ValueError(f"video_generator.vae_from must be one of: {', '.join(VAE_SOURCES)}; "
                             f"got {self.vae_from!r}")
        positions = self.text_encoder.get("max_position_embeddings", 77)
        if self.prompt_length > positions:
            raise ValueError(f"video_generator.prompt_length ({self.prompt_length}) exceeds "
                             f"text_encoder.max_position_embeddings ({positions})")
        if self.text_encoder.get("hidden_size") != self.unet.get("cross_attention_dim"):
            raise ValueError("video_generator: text_encoder.hidden_size and unet.cross_attention_dim must agree, got "
                             f"{self.text_encoder.get('hidden_size')} and {self.unet.get('cross_attention_dim')}")
        if self.vae_from == "train" and self.unet.get("in_channels") != self.vae.get("latent_channels"):
            raise ValueError("video_generator: unet.in_channels and vae.latent_channels must agree, got "
                             f"{self.unet.get('in_channels')} and {self.vae.get('latent_channels')}")

    @classmethod
    def smoke(cls) -> "VideoGeneratorPhase":
        """A seconds-long version (own tiny VAE, so it needs no image phase): checks the machinery only."""
        return cls(bank_size=16, vae_from="train", vae=_default_video_vae() | {"block_out_channels": [8, 8, 8]},
                   unet=_default_video_unet() | {"block_out_channels": [8, 16], "norm_num_groups": 4,
                                                  "cross_attention_dim": 16, "attention_head_dim": 2},
                   text_encoder=_default_video_text_encoder() | {"hidden_size": 16, "intermediate_size": 32,
                                                                  "num_attention_heads": 2, "num_hidden_layers": 1},
                   vae_steps=4, vae_batch_size=4, steps=4, batch_size=2, warmup_steps=1, checkpoint_every=2,
                   log_every=1, eval_every=0, eval_prompts=2, final_eval_prompts=2, sample_steps=2)


def _default_encoder_options() -> dict[str, Any]:
    """A tiny ImageBind for the world: 64 px vision (the 32 px videos are upscaled; patch 8: 64 tubes
    of 2 frames; three blocks), a 128-band fbank of one 1.024 s clip (patch 16, stride 10: 12 x 9
    patches; two blocks), width 64, a 64-d joint space. ``text`` is never built (no text modality).
    The 64 px, patch-8, three-block vision trunk is what reads shape and direction reliably
    (against 32 px, patch 4, two blocks: docs/toyworld.md, "Model-side phases")."""
    return {"out_embed_dim": 64,
            "vision": {"embed_dim": 64, "depth": 3, "num_heads": 4, "drop_path": 0.0},
            "audio": {"embed_dim": 64, "depth": 2, "num_heads": 4, "drop_path": 0.0},
            "text": {"embed_dim": 32, "depth": 1, "num_heads": 2, "drop_path": 0.0},
            "mlp_ratio": 2, "image_size": 64, "patch_size": 8, "video_frames": 2, "video_clips": 2,
            # The world's videos are 8 bare frames: two equal segments, one centre crop (ImageBind's
            # 2 s windows and three crops are for real videos with a frame rate); see docs/imagebind.md.
            "video_crops": 1, "video_sampling": "segments",
            "num_mel_bins": 128, "audio_target_len": 100, "audio_patch_size": 16, "audio_patch_stride": 10,
            "audio_sample_rate": world.SAMPLE_RATE, "audio_clip_duration": world.CLIP_SAMPLES / world.SAMPLE_RATE,
            "audio_clips": 1, "audio_channel": "mean", "audio_demean": "per_clip",
            "text_context_length": 16, "text_vocab_size": 128}


@dataclass
class EncoderPhase:
    """The tiny ImageBind and its training: one linear classifier per world field on the pooled
    embedding (cross-entropy, summed over fields and modalities), AdamW with warm-up + cosine."""

    seed: int = 0
    options: dict[str, Any] = field(default_factory=_default_encoder_options)
    bank_size: int = 2048  # renders per modality (train split, jittered), preprocessed once
    # 3,200 against 1,600: seen image shape 70% -> 89%, position 73% -> 97%; held-out video colour 77%
    # -> 85%, shape 73% -> 88%, audio note 90% -> 100% (docs/toyworld.md, "2026-12-07")
    steps: int = 3200
    batch_size: int = 32  # per modality and step
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    checkpoint_every: int = 100
    log_every: int = 10
    probe_samples: int = 512  # per modality and split for the final linear probes
    probe_steps: int = 300
    # Extra renders per modality, as a fraction of bank_size, changed off the world in colour and/or
    # shape (images, videos) or pitch and/or timbre (audio), with those fields' losses masked (see
    # _augmented_bank): held-out combinations (a blue triangle, an E4 sawtooth) need colour read apart
    # from shape and pitch apart from timbre. 0 turns it off.
    augment_fraction: float = 1.0
    # Learn shape (images, videos) only from the augmented renders painted off the palette: the world
    # renders keep their other labels but not their shape's, so the shape classifier never sees a
    # palette colour and cannot learn that one colour is never a given shape (the held-out pairs).
    shape_off_palette_only: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.augment_fraction <= 4.0:
            raise ValueError(f"encoder.augment_fraction must be in [0, 4], got {self.augment_fraction!r}")
        if self.shape_off_palette_only and self.augment_fraction <= 0:
            raise ValueError("encoder.shape_off_palette_only needs augmented renders (encoder.augment_fraction > 0): "
                             "they are then the only renders that teach shape")


def _default_llm() -> dict[str, Any]:
    # LlamaConfig kwargs; vocabulary size and special ids come from the tokenizer.
    return {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 256, "tie_word_embeddings": True,
            "rms_norm_eps": 1e-5}


@dataclass
class LLMPhase:
    """The tiny Llama: pretrained in full as a causal LM on world dialogues rendered exactly as the
    stages render them (signal tokens for generated media), plus stage-1 (medium -> caption) and
    stage-2 (caption -> caption + signal) turns, loss on assistant turns. Media in the loop: the
    frozen ``encoder`` phase's ImageBind and an input projector (trained with the LLM, kept for
    stage 1) fill the placeholder positions through :class:`~anymodal.model.AnyModalModel`."""

    seed: int = 0
    model: dict[str, Any] = field(default_factory=_default_llm)
    dialogues: int = 20000  # train-split dialogues of every task
    # of those dialogues: the share asked in other wordings and the share drawn as 3-5 turn sessions,
    # drawn as the stages' manifests draw them (manifests.draw_dialogue; sessions need max_length ~224).
    # 0 and 0 draw exactly the single-task template dialogues of builds before 2026-12-07's third
    # (12,000 dialogues, max_length 96, 3,000 steps). 20,000 at 0.2 / 0.2 left 12,000 template
    # dialogues and raised held-out t2i 43% -> 68% in the pipeline (docs/toyworld.md).
    rephrased: float = 0.2
    sessions: float = 0.2
    media_dialogues: int = 6000  # more of the tasks that read a medium (i2t, a2t, v2t, i2i)
    caption_turns: int = 3000  # stage-1 and stage-2 style turns each
    projector_hidden: int = 128  # the MLP input projectors' width (MEDIA_TOKENS positions per medium)
    max_length: int = 224  # sessions run to ~224 tokens; longer rows are left out, not cut
    steps: int = 4000
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    checkpoint_every: int = 200
    log_every: int = 10
    eval_dialogues: int = 40  # dialogues per text-determined task and per understanding direction at the end

    def __post_init__(self) -> None:
        check_dialogue_mix(self.rephrased, self.sessions, where="llm.")


@dataclass
class StagesPhase:
    """The three anymodal stages on the trained components (anymodal.training.train settings)."""

    n_captions: int = 1500  # per modality, for write_manifests
    # 20,000: about two passes in stage 3's 2,500 steps of 16; at 3,000 (13 passes) stage 3 eroded the
    # LLM's copying of held-out pairs (t2i 67.5% against 100%; docs/toyworld.md, "Eighth session")
    n_dialogues: int = 20000
    # of the stage-3 dialogues: the share asked in other wordings (world.ask_for / ask_about, the
    # "train" forms) and the share drawn as 3-5 turn sessions (world.sample_session)
    rephrased: float = 0.35
    sessions: float = 0.35
    copies: float = 0.1  # text-only "say <words>" tasks: the LLM copies held-out pairs it never saw together
    seed: int = 0
    stage1_steps: int = 800
    stage2_steps: int = 3000  # the output projectors need several times stage 1's steps to reach their targets
    stage3_steps: int = 2500
    batch_size: int = 16
    lr: tuple[float, float, float] = (1e-3, 1e-3, 1e-3)
    warmup_steps: int = 20
    # r 16 on every linear layer: half the stage-3 loss of r 8 on attention only, and better held-out
    # understanding (docs/toyworld.md, "Model-side phases")
    lora_r: int = 16
    lora_alpha: int = 32
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    save_every: int = 50
    projector_hidden: int = 128  # output projectors; input projectors too unless the llm phase's are carried
    # start stage 1 from the input projectors the llm phase trained with the LLM (out/llm/input_projectors)
    carry_input_projectors: bool = True
    output_layers: int = 1  # each further layer of width 128 adds about 2 MB per projector against the ship limit
    # The LLM hidden state each output projector reads (OutputProjectorConfig.hidden_layer; -1, the last,
    # where a modality is not named). Images read the second of four layers: the last layer's signal
    # states compose held-out colour x shape pairs in some LLM-phase runs and not in others, the second's
    # in both. Audio keeps the last: read at layer 2 it lost 10 points of held-out t2a in both runs
    # (docs/toyworld.md, "Which LLM layer the output projectors read").
    output_hidden_layers: dict[str, int] = field(default_factory=lambda: {"image": 2})
    # > 0: stage 2 adds the frozen generators' denoising loss for these outputs (training.denoise_*).
    # Video only: it lifts held-out t2v and costs stage 2 about three times its time; on images it buys
    # nothing for more time again (docs/toyworld.md, "Stage-2 denoising loss").
    stage2_denoise_weight: float = 4.0
    denoise_modalities: tuple[str, ...] = ("video",)
    max_new_tokens: int = 40
    eval_prompts: int = 20  # per direction, for anymodal eval on out/final once the stages are done
    image_settings: dict[str, Any] = field(default_factory=lambda: {"num_inference_steps": 20, "guidance_scale": 3.0})
    audio_settings: dict[str, Any] = field(default_factory=lambda: {
        "num_inference_steps": 20, "guidance_scale": 3.0,
        "audio_length_s": world.CLIP_SAMPLES / world.SAMPLE_RATE})
    video_settings: dict[str, Any] = field(default_factory=lambda: {
        "num_inference_steps": 20, "guidance_scale": 3.0, "num_frames": world.VIDEO_FRAMES,
        "height": world.VIDEO_SIZE, "width": world.VIDEO_SIZE})

    def __post_init__(self) -> None:
        check_dialogue_mix(self.rephrased, self.sessions, self.copies, where="stages.")
        layers = self.output_hidden_layers
        if not isinstance(layers, dict) or any(k not in ("image", "audio", "video") for k in layers) or any(
                not isinstance(v, int) or isinstance(v, bool) or v == 0 for v in layers.values()):
            raise ValueError(f"stages.output_hidden_layers must map image / audio / video to a non-zero integer "
                             f"(1 = after the LLM's first layer, -1 = its last), got {layers!r}")
        if self.stage2_denoise_weight < 0:
            raise ValueError(f"stages.stage2_denoise_weight must be >= 0, got {self.stage2_denoise_weight}")
        from ..training.config import DENOISE_MODALITIES

        bad = [m for m in self.denoise_modalities if m not in DENOISE_MODALITIES]
        if bad or not self.denoise_modalities:
            raise ValueError(f"stages.denoise_modalities must name image and/or video (the generators with a "
                             f"denoising loss), got {list(self.denoise_modalities)}")


@dataclass
class ModelPhasesConfig:
    encoder: EncoderPhase = field(default_factory=EncoderPhase)
    llm: LLMPhase = field(default_factory=LLMPhase)
    stages: StagesPhase = field(default_factory=StagesPhase)

    def __post_init__(self) -> None:
        layers = int(self.llm.model.get("num_hidden_layers", 1))
        for m, k in self.stages.output_hidden_layers.items():
            if abs(k) > layers:
                raise ValueError(f"stages.output_hidden_layers[{m}] is {k}, but the LLM (llm.model) has {layers} "
                                 f"layers: use 1 to {layers}, or -1 to -{layers}")

    @classmethod
    def preset(cls, name: str) -> "ModelPhasesConfig":
        if name == "default":
            return cls()
        if name == "smoke":
            opts = _default_encoder_options()
            for b in ("vision", "audio"):
                opts[b] = {"embed_dim": 16, "depth": 1, "num_heads": 2, "drop_path": 0.0}
            opts["out_embed_dim"] = 16
            llm = _default_llm() | {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                    "num_attention_heads": 2, "num_key_value_heads": 1}
            return cls(EncoderPhase(options=opts, bank_size=24, steps=4, batch_size=4, warmup_steps=1,
                                    checkpoint_every=2, log_every=1, probe_samples=16, probe_steps=5),
                       LLMPhase(model=llm, dialogues=60, media_dialogues=12, caption_turns=20, projector_hidden=16,
                                steps=4, batch_size=4, warmup_steps=1, checkpoint_every=2, log_every=1,
                                eval_dialogues=2),
                       StagesPhase(n_captions=8, n_dialogues=16, stage1_steps=2, stage2_steps=2, stage3_steps=2,
                                   batch_size=4, warmup_steps=0, save_every=1, projector_hidden=16, output_layers=1,
                                   max_new_tokens=24, eval_prompts=1, output_hidden_layers={},
                                   image_settings={"num_inference_steps": 2, "guidance_scale": 3.0},
                                   audio_settings={"num_inference_steps": 2, "guidance_scale": 3.0,
                                                   "audio_length_s": world.CLIP_SAMPLES / world.SAMPLE_RATE},
                                   video_settings={"num_inference_steps": 2, "guidance_scale": 3.0,
                                                   "num_frames": world.VIDEO_FRAMES, "height": world.VIDEO_SIZE,
                                                   "width": world.VIDEO_SIZE}))
        raise ValueError(f"unknown preset {name!r}; expected default or smoke")


@dataclass
class ToyworldTrainConfig:
    """Every phase's settings. ``preset("default")`` is what ``anymodal toyworld train`` runs;
    ``preset("smoke")`` is a seconds-long version for tests and for checking an installation."""

    tokenizer: TokenizerPhase = field(default_factory=TokenizerPhase)
    image_generator: ImageGeneratorPhase = field(default_factory=ImageGeneratorPhase)
    audio_generator: AudioGeneratorPhase = field(default_factory=AudioGeneratorPhase)
    video_generator: VideoGeneratorPhase = field(default_factory=VideoGeneratorPhase)
    encoder: EncoderPhase = field(default_factory=EncoderPhase)
    llm: LLMPhase = field(default_factory=LLMPhase)
    stages: StagesPhase = field(default_factory=StagesPhase)

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
            model = ModelPhasesConfig.preset("smoke")
            return cls(TokenizerPhase(dialogues=500),
                       ImageGeneratorPhase(bank_size=64, vae=vae, unet=unet, text_encoder=text, **small),
                       AudioGeneratorPhase(bank_size=32, vae=_default_audio_vae() | {"block_out_channels": [8, 8, 8]},
                                           unet=audio_unet, text_encoder=clap, vocoder=vocoder, **small),
                       VideoGeneratorPhase.smoke(), model.encoder, model.llm, model.stages)
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


def _check_recipe(where: str, cfg: Any) -> None:
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and f.name not in (
                "seed", "kl_weight", "weight_decay", "caption_dropout", "eval_every", "warmup_steps",
                "text_aux_weight", "augment_fraction"):
            _check_positive(f"{where}.{f.name}", value)
    if not 0.0 <= cfg.caption_dropout < 1.0:
        raise ValueError(f"{where}.caption_dropout must be in [0, 1), got {cfg.caption_dropout!r}")
    augment = getattr(cfg, "augment_fraction", 0.0)  # the image and audio generators' augmentation
    if not 0.0 <= augment <= 2.0:
        raise ValueError(f"{where}.augment_fraction must be in [0, 2], got {augment!r}")
    aux = getattr(cfg, "text_aux_weight", 0.0)  # the generators' caption loss; 0 turns it off
    if aux < 0:
        raise ValueError(f"{where}.text_aux_weight must be >= 0, got {aux!r}")
    if not 0.0 < cfg.ema_decay < 1.0:
        raise ValueError(f"{where}.ema_decay must be in (0, 1), got {cfg.ema_decay!r}")


def check_dialogue_mix(rephrased: float, sessions: float, copies: float | None = None, where: str = "") -> None:
    """The shares of a dialogue draw (``manifests.draw_dialogue``): ``rephrased`` and ``sessions`` are
    fractions summing to at most 1, ``copies`` (None: the draw has no such share) a fraction; ``where``
    prefixes the names in the error."""
    if 0 <= rephrased and 0 <= sessions and rephrased + sessions <= 1 and (copies is None or 0 <= copies <= 1):
        return
    if copies is None:
        raise ValueError(f"{where}rephrased and {where}sessions are fractions summing to at most 1, got "
                         f"{rephrased!r} and {sessions!r}")
    raise ValueError(f"{where}rephrased and {where}sessions are fractions summing to at most 1 and {where}copies a "
                     f"fraction, got {rephrased}, {sessions}, {copies}")


def _as_float(value: Any) -> Any:
    """``value`` as a float where it reads as one (YAML reads 1e-3, without a dot, as a string)."""
    if isinstance(value, bool):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
