"""The toy world's ``video-generator`` phase: a tiny ModelScope text-to-video (Zeroscope's layout).

A real diffusers ``TextToVideoSDPipeline`` (what NExT-GPT's Zeroscope is; anymodal's
``text-to-video`` adapter loads it) trained from scratch on the world's videos, train split only
(held-out colour x direction and colour x shape pairs are never seen):

1. **VAE**: by default the image generator's ``AutoencoderKL`` (``<out>/image-vae``; all
   convolutions, trained on 32x32 crops, so it encodes each 32x32 frame to 8x8x8), copied into
   ``state/video-generator/vae`` at the first start so that a later image run cannot change it
   under a resumed video run. ``vae_from="train"`` trains ``vae`` on the frames instead.
   ``TextToVideoSDPipeline`` decodes frame by frame, exactly as the VAE was trained.
2. **UNet + text encoder**: a ``UNet3DConditionModel`` (spatial resnets with temporal convs,
   spatial cross-attention to the text and temporal self-attention) and a tiny ``CLIPTextModel``
   over the word-level tokenizer, trained jointly with the image recipe (v-prediction, cosine
   DDPM, AdamW with warm-up + cosine, EMA, caption dropout) through the shared ``train_loop``,
   so stopping and resuming is bit-identical. A training-only linear head on the text encoder's
   pooled states predicts colour, shape and direction (``text_aux_weight``): without it the
   from-scratch text tower gave the four directions one embedding.
3. Saved with a ``DPMSolverMultistepScheduler``; sample with 20 steps and guidance 3, 8 frames of
   32x32 (``GeneratorConfig(type="text-to-video", pretrained=..., settings={"num_frames": 8,
   "height": 32, "width": 32, ...})``, see :func:`generator_config`).

The phase's settings are :class:`~anymodal.toyworld.recipe.VideoGeneratorPhase`.

Evaluation generates ``spec.caption()`` prompts of seen and held-out specs through the adapter
(``encode_text``, then ``render``) and scores them with :func:`checkers.score_video`
(``found``, ``colour_ok``, ``shape_ok``, ``direction_ok``, ``ok``).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..modality import Modality
from ..utils import quiet_loading
from . import checkers, world
from .diffusion import (caption_aux_loss, encode_latents, eval_with_ema, images_to_tensor, masked_mean_states, new_vae,
                        noise_scheduler, tensor_to_images, text_config_kwargs, to_device, token_ids, train_denoiser,
                        train_vae)
from .loop import EMA, JsonlLog, RunControl, atomic_dir, device_of
from .recipe import VideoGeneratorPhase
from .tokenizer import load_tokenizer


PHASE = "video-generator"
EVALUATION_NOTE = ("checkers.score_video on prompts = spec.caption() of specs sampled from the train split (seen) "
                   "and from held-out colour x direction and colour x shape pairs (heldout); generated through the "
                   "text-to-video adapter (TextToVideoSDPipeline, 8 frames of 32x32) with DPM-Solver++ and "
                   "classifier-free guidance")


def _build_video_models(cfg: VideoGeneratorPhase, tokenizer: Any, vae_dir: Path | None) -> dict[str, torch.nn.Module]:
    from diffusers import AutoencoderKL, UNet3DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        if vae_dir is None:
            vae = new_vae(cfg.vae)
        else:
            vae = AutoencoderKL.from_pretrained(str(vae_dir))
            if vae.config.latent_channels != cfg.unet.get("in_channels"):
                raise ValueError(f"video_generator: the VAE in {vae_dir} has {vae.config.latent_channels} latent "
                                 f"channels, unet.in_channels is {cfg.unet.get('in_channels')}")
        unet = UNet3DConditionModel(**cfg.unet)
        # UNet3D's temporal convs hard-code dropout 0.1, which draws from the global RNG (not the
        # loop's checkpointed generator) and would break bit-identical resume; a model this small
        # under-fits rather than over-fits. Eval mode ignores dropout: the saved pipeline is unaffected.
        for m in unet.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config_kwargs(tokenizer, cfg.text_encoder)))
    return {"vae": vae, "unet": unet, "text_encoder": text_encoder}


def _assemble_video_pipeline(models: dict[str, torch.nn.Module], tokenizer: Any, cfg: VideoGeneratorPhase) -> Any:
    from diffusers import DPMSolverMultistepScheduler, TextToVideoSDPipeline

    tok = copy.deepcopy(tokenizer)
    tok.model_max_length = cfg.prompt_length
    scheduler = DPMSolverMultistepScheduler.from_config(noise_scheduler().config, steps_offset=1)
    with quiet_loading():  # no notice that the wrapped pipeline class is deprecated
        pipe = TextToVideoSDPipeline(vae=models["vae"], text_encoder=models["text_encoder"], tokenizer=tok,
                                     unet=models["unet"], scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generator_config(directory: str | Path, steps: int = 20, guidance: float = 3.0) -> Any:
    """The anymodal ``GeneratorConfig`` of a saved video generator (8 frames of 32x32)."""
    from anymodal.config import GeneratorConfig

    return GeneratorConfig(type="text-to-video", pretrained=str(directory),
                           settings={"num_inference_steps": steps, "guidance_scale": guidance,
                                     "num_frames": world.VIDEO_FRAMES, "height": world.VIDEO_SIZE,
                                     "width": world.VIDEO_SIZE})


def video_eval_specs(n: int, seed: int) -> dict[str, list[world.VideoSpec]]:
    """``n`` seen (train split) and ``n`` held-out video specs, fixed by ``seed``."""
    return {name: world.sample_specs(Modality.VIDEO, n, seed + k, split)  # type: ignore[misc]
            for k, (name, split) in enumerate((("seen", "train"), ("heldout", "heldout")))}


def score_videos(videos: Sequence[Any], specs: Sequence[world.VideoSpec]) -> dict[str, float]:
    """Fraction of videos whose checker reading matches each field (colour, shape, direction), plus ``ok``."""
    scores = [checkers.score_video(v, spec) for v, spec in zip(videos, specs)]
    keys = sorted({k for s in scores for k in s})
    return {k: round(float(np.mean([s.get(k, False) for s in scores])), 4) for k in keys}


def evaluate_video_pipeline(pipe: Any, n: int, seed: int, steps: int, guidance: float) -> dict[str, Any]:
    """Generate ``n`` seen and ``n`` held-out prompts with ``pipe`` and score the videos analytically."""
    out: dict[str, Any] = {}
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        for split, specs in video_eval_specs(n, seed).items():
            t0 = time.time()
            frames = pipe([s.caption() for s in specs], num_frames=world.VIDEO_FRAMES, height=world.VIDEO_SIZE,
                          width=world.VIDEO_SIZE, num_inference_steps=steps, guidance_scale=guidance,
                          generator=torch.Generator().manual_seed(seed), output_type="np").frames
            out[split] = score_videos(list(frames), specs) | {"n": len(specs),
                                                               "s_per_video": round((time.time() - t0) / n, 3)}
    return out


def evaluate_video_generator(directory: Path, n: int, seed: int, steps: int, guidance: float,
                             device: str = "cpu") -> dict[str, Any]:
    """Load a saved pipeline through anymodal's ``text-to-video`` adapter and score its videos.

    The prompts are encoded by the generator's own text encoder (``encode_text``) and generated
    with ``render``: exactly the path the anymodal pipeline drives.
    """
    import anymodal.generators  # noqa: F401  (registers the adapters)
    from anymodal.registry import GENERATORS

    gen = GENERATORS.get("text-to-video").from_config(generator_config(directory, steps, guidance))
    gen.to(device)
    out: dict[str, Any] = {}
    with torch.random.fork_rng(devices=[]):
        for split, specs in video_eval_specs(n, seed).items():
            t0 = time.time()
            cond = gen.encode_text([s.caption() for s in specs])
            videos = gen.render(cond, rng=torch.Generator().manual_seed(seed))
            out[split] = score_videos(videos, specs) | {"n": len(specs),
                                                         "s_per_video": round((time.time() - t0) / n, 3)}
    return out


def _frames(data: np.ndarray) -> torch.Tensor:
    """(N, T, H, W, 3) uint8 -> (N * T, 3, H, W) in [-1, 1]: frames, what the VAE encodes."""
    n, t = data.shape[:2]
    return images_to_tensor(data.reshape(n * t, *data.shape[2:]))


def _vae_reconstruction_scores(vae: Any, bank: world.Bank, n: int = 100) -> dict[str, float]:
    """Checker accuracy of the VAE's reconstructions of real videos: the ceiling of the diffusion model."""
    n = min(n, len(bank))
    with torch.no_grad():
        recon = vae.decode(vae.encode(_frames(bank.data[:n]).to(device_of(vae))).latent_dist.mean).sample
    frames = tensor_to_images(recon)
    return score_videos(list(frames.reshape(n, -1, *frames.shape[1:])), bank.specs[:n])


def _vae_source(out: Path, state_dir: Path, cfg: VideoGeneratorPhase) -> Path | None:
    """Where the VAE comes from: a copy of the image phase's VAE kept in the state (None: train one)."""
    if cfg.vae_from == "train":
        return None
    kept = state_dir / "vae"
    if not (kept / "config.json").exists():
        source = out / "image-vae"
        if not (source / "config.json").exists():
            raise ValueError(f"video_generator.vae_from='image-generator' needs the image generator's VAE in "
                             f"{source}; run the 'image-vae' phase first, or set video_generator.vae_from=train")
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(str(source))
        atomic_dir(kept, lambda d: vae.save_pretrained(str(d), safe_serialization=True))
    return kept


def train_video_generator(out: Path, cfg: VideoGeneratorPhase, log: JsonlLog, control: RunControl) -> Path:
    """Train the ``video-generator`` phase into ``out / "video-generator"`` (resumable; see the module doc)."""
    state_dir = out / "state" / PHASE
    state_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(out)
    models = to_device(_build_video_models(cfg, tokenizer, _vae_source(out, state_dir, cfg)), control.device)
    vae, unet, text_encoder = models["vae"], models["unet"], models["text_encoder"]

    bank = world.make_bank(Modality.VIDEO, cfg.bank_size, "train", seed=cfg.seed)
    frames = _frames(bank.data)  # (N * T, 3, H, W)
    log.write(stage="data", event="bank", n=len(bank), split="train", seed=cfg.seed, vae_from=cfg.vae_from,
              params={k: sum(p.numel() for p in m.parameters()) for k, m in models.items()})

    # ---------------------------------------------------------------- 1. the VAE (per frame)
    if cfg.vae_from == "train":
        train_vae(vae, frames, cfg, state_dir / "vae.ckpt", log, control, "video_generator")
    vae.eval().requires_grad_(False)
    latents = encode_latents(vae, frames, state_dir / "latents.pt", log, cfg.vae_steps if cfg.vae_from == "train" else 0,
                       lambda: _vae_reconstruction_scores(vae, bank))
    n, t = bank.data.shape[:2]
    latents = latents.reshape(n, t, *latents.shape[1:]).permute(0, 2, 1, 3, 4).contiguous()  # (N, C, T, h, w)

    # ---------------------------------------------------------------- 2. UNet3D + text encoder
    ids = token_ids(tokenizer, bank.captions, cfg.prompt_length)
    empty = token_ids(tokenizer, [""], cfg.prompt_length)

    def condition(tokens: torch.Tensor) -> dict[str, Any]:
        return {"encoder_hidden_states": text_encoder(tokens)[0]}  # what TextToVideoSDPipeline.encode_prompt does

    def evaluate(ema: EMA, n_prompts: int) -> dict[str, Any]:
        return eval_with_ema(models, ema, lambda m: _assemble_video_pipeline(m, tokenizer, cfg),
                             evaluate_video_pipeline, cfg, n_prompts)

    pooled = masked_mean_states(condition, tokenizer.pad_token_id)
    names = (("colour", tuple(world.COLOURS)), ("shape", world.SHAPES), ("direction", tuple(world.DIRECTIONS)))
    aux_head, aux_loss = caption_aux_loss(bank.specs, names, text_encoder.config.hidden_size, cfg, pooled)

    ema = train_denoiser(unet, text_encoder, condition, latents, ids, empty, cfg, state_dir / "unet.ckpt", log,
                          control, evaluate, aux_head, aux_loss)
    ema.copy_to([unet, text_encoder])  # save the EMA weights
    pipe = _assemble_video_pipeline(models, tokenizer, cfg)
    return atomic_dir(out / PHASE, lambda d: pipe.save_pretrained(str(d), safe_serialization=True))
