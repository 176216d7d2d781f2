"""Audio generators: AudioLDM (v1, what NExT-GPT uses) and AudioLDM 2, driven by embeddings."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from anymodal.media import Audio
from anymodal.modality import Modality
from anymodal.registry import register_generator

from .components import DiffusersGenerator
from .settings import MAX_AUDIO_S, AudioSettings
from .shapes import prompt_length


class _AudioLDMFamily(DiffusersGenerator):
    """What AudioLDM and AudioLDM 2 share: a mel VAE decoded by a HiFi-GAN vocoder into waveforms."""

    modality = Modality.AUDIO
    settings_class = AudioSettings
    # anymodal's own vocoders (Griffin-Lim), which a saved pipeline's model_index.json may name
    component_modules = ("anymodal.generators.vocoders",)

    @property
    def sample_rate(self) -> int:
        return int(self.pipeline.vocoder.config.sampling_rate)

    def min_audio_length_s(self) -> float | None:
        """The shortest clip the pipeline makes: one latent frame, ``vocoder hop / rate * VAE factor``
        (diffusers' own bound); None while a lazy pipeline is not loaded."""
        if self._pipe is None:
            return None
        vocoder, pipe = self._pipe.vocoder, self._pipe
        return float(np.prod(vocoder.config.upsample_rates)) / vocoder.config.sampling_rate * pipe.vae_scale_factor

    def check_settings(self, settings: AudioSettings) -> None:
        low = self.min_audio_length_s()
        if low is not None and settings.audio_length_s < low:
            raise ValueError(f"audio.audio_length_s must be between {low:g} and {MAX_AUDIO_S:g} s for generator "
                             f"{self.type_name!r}, got {settings.audio_length_s:g}")

    def _audios(self, waveforms: np.ndarray) -> list[Audio]:
        rate = self.sample_rate
        return [Audio(array=np.asarray(w, dtype=np.float32), sample_rate=rate) for w in waveforms]


@register_generator("audioldm")
class AudioLDMGenerator(_AudioLDMFamily):
    """Wraps diffusers' (deprecated, still shipped) ``AudioLDMPipeline``: AudioLDM v1, NExT-GPT's audio decoder.

    AudioLDM is conditioned on one L2-normalised CLAP text embedding (fed to the UNet as a class
    embedding), so the conditioning is ``{"prompt_embeds": (1, D)}`` with ``D`` the CLAP projection
    width (512 for ``cvssp/audioldm``); the adapter squeezes ``(B, 1, D)`` to the ``(B, D)`` the
    pipeline takes.

    ``components`` keys: ``unet`` (``UNet2DConditionModel`` kwargs with a ``simple_projection``
    class embedding), ``vae``, ``scheduler``, ``text_encoder`` (``ClapTextConfig`` kwargs),
    ``tokenizer`` (RoBERTa: ``"bytes"``, a mapping or a local directory), ``vocoder``
    (``SpeechT5HifiGanConfig`` kwargs) and ``seed``.
    """

    type_name = "audioldm"
    required_components = ("unet", "vae", "scheduler", "text_encoder", "tokenizer", "vocoder")
    shape_components = ("text_encoder", "unet")

    @classmethod
    def pipeline_class(cls) -> type:
        from diffusers import AudioLDMPipeline

        return AudioLDMPipeline

    @classmethod
    def shapes_from(cls, configs: dict[str, Any]) -> dict[str, tuple[int, int]]:
        dim = configs["unet"].projection_class_embeddings_input_dim
        if dim is None and configs.get("text_encoder") is not None:
            dim = configs["text_encoder"].projection_dim
        if dim is None:
            raise ValueError(f"generator {cls.type_name!r}: the UNet has no projection_class_embeddings_input_dim")
        return {"prompt_embeds": (1, int(dim))}

    def _clap(self, texts: list[str]) -> torch.Tensor:
        # The pipeline's own encoder: CLAP text_embeds, L2-normalised, shape (B, D).
        return self.pipeline._encode_prompt(texts, self.execution_device, 1, False)

    def _encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return {"prompt_embeds": self._clap(texts)[:, None, :]}

    def _negative_once(self) -> dict[str, torch.Tensor]:
        return {"prompt_embeds": self._clap([""])[:, None, :]}

    def _run(self, cond: dict[str, torch.Tensor], settings: AudioSettings,
             rng: torch.Generator | list[torch.Generator] | None) -> list[Audio]:
        embeds = cond["prompt_embeds"]
        kwargs: dict[str, Any] = {"prompt_embeds": embeds[:, 0, :]}
        if settings.guidance_scale > 1.0:
            kwargs["negative_prompt_embeds"] = self.negative_conditioning(embeds.shape[0])["prompt_embeds"][:, 0, :]
        out = self._call_pipeline(
            **kwargs,
            audio_length_in_s=settings.audio_length_s,
            num_inference_steps=settings.num_inference_steps,
            guidance_scale=settings.guidance_scale,
            generator=rng,
            output_type="np",
        )
        return self._audios(out.audios)


def _mask_from_zeros(embeds: torch.Tensor) -> torch.Tensor:
    """Attention mask for T5 states padded with zero rows (see :class:`AudioLDM2Generator`)."""
    mask = (embeds != 0).any(dim=-1).long()
    # A row that is zero everywhere would mask every position and turn attention into NaNs;
    # attend to all of it instead, which is what passing no mask does.
    mask[mask.sum(dim=1) == 0] = 1
    return mask


@register_generator("audioldm2")
class AudioLDM2Generator(_AudioLDMFamily):
    """Wraps diffusers' ``AudioLDM2Pipeline`` (maintained).

    The UNet attends to two sequences, both exposed as conditioning:

    * ``prompt_embeds``: the T5 encoder's states, ``(tokenizer_2.model_max_length, text_encoder_2.d_model)``;
    * ``generated_prompt_embeds``: the GPT-2 states, ``(language_model.max_new_tokens, language_model.n_embd)``.

    The pipeline pads T5 states to the longest prompt of a batch and passes a mask; to keep shapes
    fixed, :meth:`encode_text` zeroes the masked positions and pads with zero rows to the full
    length, and :meth:`render` masks out rows that are exactly zero. A projector's output has
    no exact-zero rows, so it is attended in full.

    ``components`` keys: ``unet`` (``AudioLDM2UNet2DConditionModel`` kwargs), ``vae``,
    ``scheduler``, ``text_encoder`` (``{"text_config": ClapTextConfig kwargs, "audio_config":
    ClapAudioConfig kwargs, "projection_dim": D}``), ``tokenizer`` (RoBERTa), ``text_encoder_2``
    (``T5Config`` kwargs), ``tokenizer_2`` (T5), ``projection_model``
    (``AudioLDM2ProjectionModel`` kwargs), ``language_model`` (``GPT2Config`` kwargs plus
    ``max_new_tokens``; built as a ``GPT2LMHeadModel``), ``vocoder``, optional
    ``feature_extractor`` (``ClapFeatureExtractor`` kwargs; only used to rank several waveforms
    per prompt, which anymodal does not ask for) and ``seed``.
    """

    type_name = "audioldm2"
    required_components = ("unet", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2",
                           "tokenizer_2", "projection_model", "language_model", "vocoder")
    optional_components = ("feature_extractor",)
    shape_components = ("tokenizer_2", "text_encoder_2", "language_model")

    @classmethod
    def pipeline_class(cls) -> type:
        from diffusers import AudioLDM2Pipeline

        return AudioLDM2Pipeline

    @classmethod
    def shapes_from(cls, configs: dict[str, Any]) -> dict[str, tuple[int, int]]:
        where = f"generator {cls.type_name!r}"
        t5, lm = configs["text_encoder_2"], configs["language_model"]
        new_tokens = getattr(lm, "max_new_tokens", None)
        if not isinstance(new_tokens, int) or new_tokens < 1:
            raise ValueError(f"{where}: language_model config has no max_new_tokens")
        t5_dim = getattr(t5, "d_model", None) or t5.hidden_size
        lm_dim = getattr(lm, "n_embd", None) or lm.hidden_size
        return {
            "prompt_embeds": (prompt_length(configs.get("tokenizer_2"), None, where), int(t5_dim)),
            "generated_prompt_embeds": (int(new_tokens), int(lm_dim)),
        }

    def _embed(self, texts: list[str]) -> dict[str, torch.Tensor]:
        pipe = self.pipeline
        if not hasattr(pipe.language_model, "_update_model_kwargs_for_generation"):
            # diffusers issue #12630: checkpoints that ship a bare GPT2Model cannot run the
            # pipeline's text path with transformers >= 4.50. Projected conditioning still works.
            raise ValueError(f"generator {self.type_name!r}: the checkpoint's language_model is a "
                             f"{type(pipe.language_model).__name__} without generation helpers, so the pipeline "
                             "cannot encode text (needed by encode_text and by guidance_scale > 1); re-save it with "
                             "a GPT2LMHeadModel language model")
        embeds, mask, generated = pipe.encode_prompt(texts, self.execution_device, 1, False)
        seq, _ = self.conditioning_shapes["prompt_embeds"]
        embeds = embeds * mask[..., None].to(embeds.dtype)  # masked positions -> zero rows
        if embeds.shape[1] < seq:
            embeds = torch.nn.functional.pad(embeds, (0, 0, 0, seq - embeds.shape[1]))
        return {"prompt_embeds": embeds, "generated_prompt_embeds": generated}

    def _encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self._embed(texts)

    def _negative_once(self) -> dict[str, torch.Tensor]:
        return self._embed([""])

    def _run(self, cond: dict[str, torch.Tensor], settings: AudioSettings,
             rng: torch.Generator | list[torch.Generator] | None) -> list[Audio]:
        kwargs: dict[str, Any] = {
            "prompt_embeds": cond["prompt_embeds"],
            "attention_mask": _mask_from_zeros(cond["prompt_embeds"]),
            "generated_prompt_embeds": cond["generated_prompt_embeds"],
        }
        if settings.guidance_scale > 1.0:
            neg = self.negative_conditioning(cond["prompt_embeds"].shape[0])
            kwargs.update(negative_prompt_embeds=neg["prompt_embeds"],
                          negative_attention_mask=_mask_from_zeros(neg["prompt_embeds"]),
                          negative_generated_prompt_embeds=neg["generated_prompt_embeds"])
        out = self._call_pipeline(
            **kwargs,
            audio_length_in_s=settings.audio_length_s,
            num_inference_steps=settings.num_inference_steps,
            guidance_scale=settings.guidance_scale,
            generator=rng,
            output_type="np",
        )
        return self._audios(out.audios)
