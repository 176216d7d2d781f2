"""Video generators: ModelScope text-to-video (Zeroscope, NExT-GPT's choice) and AnimateDiff."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from anymodal.modality import Modality
from anymodal.registry import register_generator

from .components import CLIPConditionedGenerator
from .settings import VideoSettings


class _VideoGenerator(CLIPConditionedGenerator):
    modality = Modality.VIDEO
    settings_class = VideoSettings
    required_components = ("unet", "vae", "scheduler", "tokenizer")
    optional_components = ("text_encoder",)

    def _call_kwargs(self, cond: dict[str, torch.Tensor], settings: VideoSettings,
                     rng: torch.Generator | list[torch.Generator] | None) -> dict[str, Any]:
        # settings.fps only matters when the frames are written to a file.
        return {
            **self.prompt_kwargs(cond, settings.guidance_scale),
            "num_frames": settings.num_frames,
            "height": settings.height,
            "width": settings.width,
            "num_inference_steps": settings.num_inference_steps,
            "guidance_scale": settings.guidance_scale,
            "generator": rng,
            "output_type": "pil",
        }

    def _run(self, cond: dict[str, torch.Tensor], settings: VideoSettings,
             rng: torch.Generator | list[torch.Generator] | None) -> list[list[Image.Image]]:
        out = self._call_pipeline(**self._call_kwargs(cond, settings, rng))
        return [list(frames) for frames in out.frames]


@register_generator("text-to-video")
class TextToVideoGenerator(_VideoGenerator):
    """Wraps diffusers' (deprecated, still shipped) ``TextToVideoSDPipeline``: ModelScope
    text-to-video and Zeroscope (``cerspense/zeroscope_v2_576w``), NExT-GPT's video decoder.

    Conditioning: ``{"prompt_embeds": (tokenizer.model_max_length, unet.cross_attention_dim)}``,
    ``(77, 1024)`` for Zeroscope.

    ``components`` keys: ``unet`` (``UNet3DConditionModel`` kwargs), ``vae``, ``scheduler``,
    ``tokenizer``, optional ``text_encoder`` (``CLIPTextConfig`` kwargs) and ``seed``.
    """

    type_name = "text-to-video"

    @classmethod
    def pipeline_class(cls) -> type:
        from diffusers import TextToVideoSDPipeline

        return TextToVideoSDPipeline


@register_generator("animatediff")
class AnimateDiffGenerator(_VideoGenerator):
    """Wraps diffusers' ``AnimateDiffPipeline``: a Stable-Diffusion UNet plus a ``MotionAdapter``.

    ``pretrained`` must be a pipeline saved whole (``save_pretrained`` of an ``AnimateDiffPipeline``,
    which stores the motion UNet and the adapter); assembling one from an SD checkpoint and a
    separate adapter repository is done with diffusers before saving.

    Conditioning: ``{"prompt_embeds": (tokenizer.model_max_length, unet.cross_attention_dim)}``.

    ``components`` keys: ``unet`` (``UNet2DConditionModel`` kwargs), ``motion_adapter``
    (``MotionAdapter`` kwargs), ``vae``, ``scheduler``, ``tokenizer``, optional ``text_encoder``
    and ``seed``.
    """

    type_name = "animatediff"
    required_components = ("unet", "motion_adapter", "vae", "scheduler", "tokenizer")

    @classmethod
    def pipeline_class(cls) -> type:
        from diffusers import AnimateDiffPipeline

        return AnimateDiffPipeline
