"""Losses of the three stages: captioning / instruction cross-entropy, the per-token L2 alignment of
projected signal tokens with a generator's own text conditioning, and an optional denoising loss
through a frozen image or video generator."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn


def l2_alignment(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """NExT-GPT's decoder-side loss: the L2 norm of the difference per token, averaged over tokens.

    ``pred``/``target``: ``(blocks, seq, dim)``; ``mask``: ``(blocks,)``, False rows are left out.
    """
    if pred.shape != target.shape:
        raise ValueError(f"alignment target shape {tuple(target.shape)} differs from the projected "
                         f"conditioning {tuple(pred.shape)}")
    dist = torch.linalg.vector_norm(pred.float() - target.float(), dim=-1)  # (blocks, seq)
    if mask is not None:
        dist = dist[mask]
    return dist.mean()


def signal_hidden_states(hidden: torch.Tensor, input_ids: torch.Tensor, block_ids: list[int]) -> torch.Tensor:
    """The hidden state *of* each signal token, ``(blocks, block_len, dim)``, blocks in reading order."""
    starts = (input_ids == block_ids[0]).nonzero()  # row-major: batch row, then position
    n = len(block_ids)
    cols = starts[:, 1:2] + torch.arange(n, device=input_ids.device)
    if cols.numel() and int(cols.max()) >= input_ids.shape[1]:
        raise ValueError("a signal block runs past the end of its sequence")
    return hidden[starts[:, 0:1], cols]


class ImageDenoiser(nn.Module):
    """The noise-prediction loss of a frozen latent-diffusion UNet conditioned on projected signal tokens.

    Only the conditioning carries gradients; the VAE encodes target images ``(B, 3, H, W)`` in
    [-1, 1] without them. ``unet_inputs`` turns the conditioning tensors into the UNet's keyword
    arguments as the generator's pipeline does (a generator's ``unet_conditioning``; unCLIP's
    passes the image embedding as ``class_labels``); by default ``conditioning[key]`` is the
    UNet's ``encoder_hidden_states``.
    """

    def __init__(self, unet: nn.Module, vae: nn.Module, scheduler: Any, key: str = "prompt_embeds",
                 unet_inputs: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None):
        from diffusers import DDPMScheduler

        super().__init__()
        # Noise is added as in training: a DDPM scheduler with the pipeline scheduler's betas and
        # prediction type (samplers such as DPM-Solver have no add_noise/get_velocity of their own).
        self.unet, self.vae, self.key = unet, vae, key
        self.unet_inputs = unet_inputs
        self.scheduler = DDPMScheduler.from_config(scheduler.config)
        self.unet.requires_grad_(False).eval()
        self.vae.requires_grad_(False).eval()
        kind = scheduler.config.prediction_type
        if kind not in ("epsilon", "v_prediction"):
            raise ValueError(f"denoising loss: unsupported scheduler prediction_type {kind!r} "
                             "(expected epsilon or v_prediction)")

    @property
    def image_size(self) -> int:
        scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return int(self.unet.config.sample_size) * scale

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Target media -> scaled VAE latents (no gradients)."""
        with torch.no_grad():
            latents = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.sample()
        return latents * self.vae.config.scaling_factor

    def forward(self, conditioning: dict[str, torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
        latents = self.encode(pixels)
        noise = torch.randn_like(latents)
        steps = self.scheduler.config.num_train_timesteps
        t = torch.randint(0, steps, (latents.shape[0],), device=latents.device)
        noisy = self.scheduler.add_noise(latents, noise, t)
        if self.scheduler.config.prediction_type == "epsilon":
            target = noise
        else:
            target = self.scheduler.get_velocity(latents, noise, t)
        cond = {k: v.to(self.unet.dtype) for k, v in conditioning.items()}
        kwargs = self.unet_inputs(cond) if self.unet_inputs is not None else {"encoder_hidden_states": cond[self.key]}
        pred = self.unet(noisy, t, **kwargs).sample
        return F.mse_loss(pred.float(), target.float())


class VideoDenoiser(ImageDenoiser):
    """:class:`ImageDenoiser` for video UNets (``UNet3DConditionModel``, AnimateDiff's motion UNet):
    target clips ``(B, 3, F, H, W)`` in [-1, 1] are encoded frame by frame, as the text-to-video
    pipelines decode them, into latents ``(B, C, F, h, w)``."""

    def encode(self, clips: torch.Tensor) -> torch.Tensor:
        b, c, f, h, w = clips.shape
        frames = clips.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        latents = super().encode(frames)
        return latents.reshape(b, f, *latents.shape[1:]).permute(0, 2, 1, 3, 4)


def _fit(im: Any, height: int, width: int) -> Any:
    """Scale the shortest side to cover ``height x width`` (bicubic), then centre-crop."""
    from PIL import Image

    w, h = im.size
    s = max(width / w, height / h)
    im = im.resize((max(width, round(w * s)), max(height, round(h * s))), Image.BICUBIC)
    left, top = (im.width - width) // 2, (im.height - height) // 2
    return im.crop((left, top, left + width, top + height))


def _to_unit_range(im: Any) -> torch.Tensor:
    import numpy as np

    arr = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1.0)
    return arr.permute(2, 0, 1).contiguous()


class ImageForVAE:
    """Load an image file for the VAE: RGB, resized and centre-cropped to ``size``, scaled to [-1, 1].

    A plain picklable callable, so DataLoader workers can run it.
    """

    def __init__(self, size: int):
        self.size = size

    def __call__(self, path: Any) -> torch.Tensor:
        from PIL import Image

        from anymodal.media import MediaError

        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
        except (OSError, ValueError) as e:
            raise MediaError(f"cannot read image '{path}': {e}") from None
        return _to_unit_range(_fit(im, self.size, self.size))


class VideoForVAE:
    """Load a video file for a per-frame VAE: ``num_frames`` frames sampled evenly (as the encoders
    sample them), each resized and centre-cropped to ``height x width``, as ``(3, F, H, W)`` in [-1, 1].
    Picklable, like :class:`ImageForVAE`."""

    def __init__(self, num_frames: int, height: int, width: int):
        self.num_frames, self.height, self.width = num_frames, height, width

    def __call__(self, path: Any) -> torch.Tensor:
        from anymodal.encoders.preprocess import load_video_frames

        frames = load_video_frames(path, self.num_frames)
        return torch.stack([_to_unit_range(_fit(f, self.height, self.width)) for f in frames], dim=1)


def modality_losses(cond: dict[str, torch.Tensor], targets: dict[str, torch.Tensor] | None,
                    mask: torch.Tensor | None) -> torch.Tensor | None:
    """Sum of the alignment losses over a modality's conditioning tensors (one per generator input)."""
    if targets is None or mask is None or not bool(mask.any()):
        return None
    return sum(l2_alignment(cond[k], targets[k].to(cond[k].device), mask) for k in targets)


__all__ = ["l2_alignment", "signal_hidden_states", "ImageDenoiser", "VideoDenoiser", "ImageForVAE", "VideoForVAE",
           "modality_losses"]
