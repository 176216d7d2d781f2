"""Image generators: Stable Diffusion driven by ``prompt_embeds``."""

from __future__ import annotations

import warnings

import torch
from PIL import Image

from anymodal.modality import Modality
from anymodal.registry import register_generator

from .components import CLIPConditionedGenerator
from .settings import ImageSettings


@register_generator("stable-diffusion")
class StableDiffusionGenerator(CLIPConditionedGenerator):
    """Wraps diffusers' ``StableDiffusionPipeline`` (SD 1.x/2.x layouts; NExT-GPT uses SD-1.5).

    Conditioning: ``{"prompt_embeds": (tokenizer.model_max_length, unet.cross_attention_dim)}``,
    ``(77, 768)`` for SD-1.5.

    ``components`` keys: ``unet`` (``UNet2DConditionModel`` kwargs), ``vae`` (``AutoencoderKL``
    kwargs), ``scheduler`` (``{"class": ..., **kwargs}``), ``tokenizer`` (``"bytes"``, a mapping or
    a local directory), optional ``text_encoder`` (``CLIPTextConfig`` kwargs) and ``seed``.
    """

    type_name = "stable-diffusion"
    modality = Modality.IMAGE
    settings_class = ImageSettings
    required_components = ("unet", "vae", "scheduler", "tokenizer")
    optional_components = ("text_encoder",)

    @classmethod
    def pipeline_class(cls) -> type:
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    def _run(self, cond: dict[str, torch.Tensor], settings: ImageSettings,
             rng: torch.Generator | list[torch.Generator] | None) -> list[Image.Image]:
        out = self._call_pipeline(
            **self.prompt_kwargs(cond, settings.guidance_scale),
            height=settings.height,
            width=settings.width,
            num_inference_steps=settings.num_inference_steps,
            guidance_scale=settings.guidance_scale,
            generator=rng,
            output_type="pil",
        )
        flagged = [i for i, bad in enumerate(out.nsfw_content_detected or []) if bad]
        if flagged:
            warnings.warn(f"stable-diffusion: the pipeline's safety checker blacked out image(s) {flagged}",
                          stacklevel=3)
        return list(out.images)
