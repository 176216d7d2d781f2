"""Image generator conditioned on an image embedding: Stable unCLIP (SD-2.1-unCLIP), for CoDi-2-style systems."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Sequence

import torch
from PIL import Image

from anymodal.modality import Modality
from anymodal.registry import register_generator

from .components import CLIPConditionedGenerator
from .settings import ImageSettings


@dataclass
class UnCLIPImageSettings(ImageSettings):
    """:class:`ImageSettings` plus unCLIP's ``noise_level``: how much noise is added to the image
    embedding before the UNet sees it (0 = the embedding as given; more = looser variations)."""

    noise_level: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.noise_level, bool) or not isinstance(self.noise_level, int) or self.noise_level < 0:
            raise ValueError(f"image.noise_level must be an integer >= 0, got {self.noise_level!r}")


@register_generator("stable-unclip")
class StableUnCLIPGenerator(CLIPConditionedGenerator):
    """Wraps diffusers' ``StableUnCLIPImg2ImgPipeline`` (``stabilityai/stable-diffusion-2-1-unclip``),
    driven by ``image_embeds`` instead of an image.

    Conditioning: ``{"image_embeds": (1, D)}``, ``D`` the CLIP image-embedding width (1024 for
    SD-2.1-unCLIP-H, whose image tower is OpenCLIP ViT-H, the one ImageBind's image encoder
    shares; 768 for the -L variant). The adapter squeezes ``(B, 1, D)`` to the ``(B, D)`` the
    pipeline takes. The pipeline still cross-attends to text: it gets its own text encoder's
    embedding of ``""`` (what it encodes itself when given no prompt), computed once and kept.
    For classifier-free guidance the pipeline pairs the embedding with zeros, as it does itself.

    Text has no path into image-embedding space here (the pipeline has no unCLIP prior), so
    :meth:`encode_text` raises; :meth:`encode_images` (and :meth:`encode_media`, which also takes
    file paths) gives the alignment target instead: the pipeline's own CLIP image embedding of a
    target image (``targets_from = "media"``, which the trainer follows).

    ``components`` keys: ``unet`` (``UNet2DConditionModel`` kwargs with ``class_embed_type:
    projection`` and ``projection_class_embeddings_input_dim`` = 2 x D: the embedding and its
    noise-level embedding), ``vae``, ``scheduler``, ``image_noising_scheduler`` (``{"class": ...}``,
    SD-2.1-unCLIP uses DDPM with ``squaredcos_cap_v2``), ``image_encoder``
    (``CLIPVisionConfig`` kwargs incl. ``projection_dim`` = D), ``text_encoder``
    (``CLIPTextConfig`` kwargs), ``tokenizer``, and ``seed``. The image normalizer (mean and std
    of the embeddings, identity at init) and the CLIP feature extractor are built to match.
    """

    type_name = "stable-unclip"
    modality = Modality.IMAGE
    settings_class = UnCLIPImageSettings
    targets_from = "media"
    required_components = ("unet", "vae", "scheduler", "image_noising_scheduler", "image_encoder", "text_encoder",
                           "tokenizer")
    # the embedding width is read from the UNet: its class-embedding input is [embedding, noise-level embedding]
    shape_components = ("unet",)

    @classmethod
    def pipeline_class(cls) -> type:
        from diffusers import StableUnCLIPImg2ImgPipeline

        return StableUnCLIPImg2ImgPipeline

    @classmethod
    def shapes_from(cls, configs: dict[str, Any]) -> dict[str, tuple[int, int]]:
        unet = configs["unet"]
        width = unet.projection_class_embeddings_input_dim if unet.class_embed_type == "projection" else None
        if not isinstance(width, int) or width % 2:
            raise ValueError(f"generator {cls.type_name!r}: the UNet takes no [image embedding, noise level] class "
                             f"embedding (class_embed_type={unet.class_embed_type!r}, "
                             f"projection_class_embeddings_input_dim={width!r})")
        return {"image_embeds": (1, width // 2)}

    # ------------------------------------------------------------------ settings
    def make_settings(self, settings: Any = None) -> UnCLIPImageSettings:
        # A plain ImageSettings (what callers pass for any image generator) keeps this generator's noise level.
        if isinstance(settings, ImageSettings) and not isinstance(settings, UnCLIPImageSettings):
            settings = {f.name: getattr(settings, f.name) for f in fields(ImageSettings)}
        return super().make_settings(settings)

    # ------------------------------------------------------------------ conditioning
    def _encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        raise ValueError(f"generator {self.type_name!r} is conditioned on image embeddings, which text cannot give "
                         "without an unCLIP prior; use encode_images(target images) for alignment targets")

    def encode_images(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        """``{"image_embeds": (B, 1, D)}``: the pipeline's own CLIP image embedding of each image, the
        conditioning that asks for a variation of it (and the target an output projector learns)."""
        if isinstance(images, Image.Image) or not isinstance(images, (list, tuple)) or not images:
            raise ValueError(f"encode_images expects a non-empty list of PIL images, got {images!r}")
        pipe = self.pipeline
        pixels = pipe.feature_extractor(images=list(images), return_tensors="pt").pixel_values
        encoder = pipe.image_encoder
        with torch.no_grad():
            embeds = encoder(pixels.to(device=self.execution_device, dtype=encoder.dtype)).image_embeds
        return {"image_embeds": embeds[:, None, :]}

    def encode_media(self, items: list[Any]) -> dict[str, torch.Tensor]:
        """:meth:`encode_images` of image files (paths) or images; an unreadable file raises ``MediaError``."""
        from anymodal.encoders.preprocess import load_image

        if isinstance(items, (str, Image.Image)) or not isinstance(items, (list, tuple)) or not items:
            raise ValueError(f"encode_media expects a non-empty list of image paths or images, got {items!r}")
        return self.encode_images([load_image(x) for x in items])

    def unet_conditioning(self, conditioning: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """As the pipeline conditions its UNet: the image embedding, noised at the configured
        ``noise_level`` and joined with that level's embedding, as ``class_labels``; the empty
        prompt's text embedding as ``encoder_hidden_states``. Gradients flow to the embedding."""
        embeds = conditioning["image_embeds"][:, 0, :]
        pipe = self.pipeline
        labels = pipe.noise_image_embeddings(embeds, self.make_settings().noise_level)
        prompt = self._empty_prompt(embeds.shape[0]).to(device=embeds.device, dtype=embeds.dtype)
        return {"encoder_hidden_states": prompt, "class_labels": labels}

    def _empty_prompt(self, batch: int) -> torch.Tensor:
        # The pipeline's prompt when it is given none (""), encoded once and cached with the negative.
        return self.negative_conditioning(batch)["prompt_embeds"]

    def _run(self, cond: dict[str, torch.Tensor], settings: UnCLIPImageSettings,
             rng: torch.Generator | list[torch.Generator] | None) -> list[Image.Image]:
        embeds = cond["image_embeds"][:, 0, :]
        prompt = self._empty_prompt(embeds.shape[0])
        kwargs: dict[str, Any] = {"prompt_embeds": prompt}
        if settings.guidance_scale > 1.0:
            kwargs["negative_prompt_embeds"] = prompt
        steps = self.pipeline.image_noising_scheduler.config.num_train_timesteps
        if settings.noise_level >= steps:
            raise ValueError(f"image.noise_level must be below the image noising scheduler's {steps} steps, "
                             f"got {settings.noise_level}")
        out = self._call_pipeline(
            image_embeds=embeds,
            **kwargs,
            noise_level=settings.noise_level,
            height=settings.height,
            width=settings.width,
            num_inference_steps=settings.num_inference_steps,
            guidance_scale=settings.guidance_scale,
            generator=rng,
            output_type="pil",
        )
        return list(out.images)
