"""The ``image-vae`` and ``image-generator`` phases: a tiny Stable Diffusion on the world's images.

``image-vae`` trains the ``AutoencoderKL`` (64x64x3 -> 16x16x8) to ``out/image-vae``; the image and
video generators both encode with it. ``image-generator`` trains a ``UNet2DConditionModel`` and a
tiny ``CLIPTextModel`` on its latents and saves a ``StableDiffusionPipeline`` (with a
``DPMSolverMultistepScheduler``) to ``out/image-generator``, scored through anymodal's
``stable-diffusion`` adapter by :mod:`~anymodal.toyworld.checkers`.
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
from .diffusion import (caption_aux_loss, encode_latents, eval_with_ema, field_labels, images_to_tensor,
                        masked_mean_states, new_vae, noise_scheduler, tensor_to_images, text_config_kwargs, to_device,
                        token_ids, train_denoiser, train_vae)
from .loop import EMA, JsonlLog, RunControl, atomic_dir, device_of
from .recipe import ImageGeneratorPhase
from .tokenizer import load_tokenizer


EVALUATION_NOTE = ("checkers.score_image on prompts = spec.caption() of specs sampled from the train split "
                   "(seen) and from held-out colour x shape pairs (heldout); generated through the "
                   "stable-diffusion adapter with DPM-Solver++ and classifier-free guidance")


def _build_image_models(cfg: ImageGeneratorPhase, tokenizer: Any) -> dict[str, torch.nn.Module]:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        vae = new_vae(cfg.vae)
        unet = UNet2DConditionModel(**cfg.unet)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config_kwargs(tokenizer, cfg.text_encoder)))
    return {"vae": vae, "unet": unet, "text_encoder": text_encoder}


def _assemble_pipeline(models: dict[str, torch.nn.Module], tokenizer: Any, cfg: ImageGeneratorPhase) -> Any:
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    tok = copy.deepcopy(tokenizer)
    tok.model_max_length = cfg.prompt_length
    # steps_offset only matters for "leading" spacing; 1 is what StableDiffusionPipeline checks for.
    scheduler = DPMSolverMultistepScheduler.from_config(noise_scheduler().config, steps_offset=1)
    with quiet_loading():  # no notice that the wrapped pipeline class is deprecated
        pipe = StableDiffusionPipeline(vae=models["vae"], text_encoder=models["text_encoder"], tokenizer=tok,
                                       unet=models["unet"], scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# The fields the auxiliary text loss (``text_aux_weight``) predicts from a caption.
AUX_FIELDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("colour", tuple(world.COLOURS)), ("shape", tuple(world.SHAPES)), ("size", tuple(world.SIZES)),
    ("position", tuple(world.POSITIONS)), ("background", tuple(world.BACKGROUNDS)))


def _image_bank(cfg: ImageGeneratorPhase) -> tuple[world.Bank, torch.Tensor]:
    bank = world.make_bank(Modality.IMAGE, cfg.bank_size, "train", seed=cfg.seed)
    return bank, images_to_tensor(bank.data)


def augmented_image_bank(n: int, seed: int) -> tuple[torch.Tensor, list[str], list[world.ImageSpec]]:
    """``n`` train-split images painted off the palette (:func:`~.encoder.off_palette_rgb`, at least 110
    from the background, 60 from every palette colour and 120 from the colours the shape is held out
    with, in RGB) and captioned without their colour: "a small triangle on the left on a white background". Returns the
    pixels (as :func:`images_to_tensor`), the captions and the specs drawn (their colour is a palette
    colour's, which the picture does not show)."""
    from .encoder import off_palette_rgb

    g = np.random.default_rng(seed)
    specs = world.sample_specs(Modality.IMAGE, n, g, "train")
    palette = np.array(list(world.COLOURS.values()), dtype=float)
    partners = {shape: [world.COLOURS[c] for c, sh in world.HELD_OUT.image if sh == shape] for shape in world.SHAPES}

    def visible(s: world.ImageSpec) -> tuple[float, float, float]:
        # >= 110 in RGB from its background (the palette is >= 130), so the shape shows; >= 60 from every
        # palette colour, so it reads as none of them; >= 120 from the colours this shape is held out
        # with, so not even a near miss of a held-out pair (a lime circle, a violet triangle) is drawn
        while True:
            rgb = np.asarray(off_palette_rgb(g))
            if (min(np.linalg.norm(rgb - c) for c in world.BACKGROUNDS[s.background]) >= 110
                    and np.linalg.norm(palette - rgb, axis=1).min() >= 60
                    and all(np.linalg.norm(rgb - c) >= 120 for c in partners[s.shape])):
                return tuple(float(v) for v in rgb)

    data = np.stack([world.render_image(s, g, rgb=visible(s)) for s in specs])
    captions = []
    for s in specs:  # the world's caption with the colour word left out
        words = ([s.size] if s.size != "medium" else []) + [s.shape]
        rest = s.caption().split(f"{s.colour} {s.shape}", 1)[1]
        captions.append(f"{world._article(words[0])} {' '.join(words)}{rest}")
    return images_to_tensor(data), captions, specs


def eval_specs(n: int, seed: int) -> dict[str, list[world.ImageSpec]]:
    """``n`` seen (train split) and ``n`` held-out image specs, fixed by ``seed``."""
    return {split_name: world.sample_specs(Modality.IMAGE, n, seed + k, split)  # type: ignore[misc]
            for k, (split_name, split) in enumerate((("seen", "train"), ("heldout", "heldout")))}


def score_images(images: Sequence[Any], specs: Sequence[world.ImageSpec]) -> dict[str, float]:
    """Fraction of images whose checker reading matches each field of the spec, plus ``ok`` (all),
    and ``shape_ok_<size>``: shape accuracy among the specs of each size (the generator's shape
    misses are mostly its small shapes, docs/toyworld.md)."""
    scores = [checkers.score_image(img, spec) for img, spec in zip(images, specs)]
    keys = sorted({k for s in scores for k in s})
    out = {k: round(float(np.mean([s.get(k, False) for s in scores])), 4) for k in keys}
    for size in world.SIZES:
        of_size = [s.get("shape_ok", False) for s, spec in zip(scores, specs) if spec.size == size]
        if of_size:
            out[f"shape_ok_{size}"] = round(float(np.mean(of_size)), 4)
    return out


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
    with ``render``: exactly the path the anymodal pipeline drives.
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
            images = gen.render(cond, rng=torch.Generator().manual_seed(seed))
            out[split] = score_images(images, specs) | {"n": len(specs),
                                                           "s_per_image": round((time.time() - t0) / n, 3)}
    return out


def train_image_vae(out: Path, cfg: ImageGeneratorPhase, log: JsonlLog, control: RunControl) -> Path:
    """The ``image-vae`` phase: the image generator's ``AutoencoderKL`` (``image_generator.vae*``
    settings), saved to ``out / "image-vae"``. The image and video generators both encode with it.

    When the run directory's finished ``image-generator`` already holds a trained VAE
    (``image-generator/vae``, from a run that trained the VAE inside that phase), that VAE is exported
    as it is, without training, so the image generator and the exported VAE stay one and the same.
    """
    from diffusers import AutoencoderKL

    in_generator = out / "image-generator" / "vae"
    if (in_generator / "config.json").is_file():
        vae = AutoencoderKL.from_pretrained(str(in_generator))
        log.write(stage="vae", event="exported", source=str(in_generator))
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            vae = new_vae(cfg.vae)  # as _build_image_models draws it, first
        vae.to(control.device)
        bank, pixels = _image_bank(cfg)
        log.write(stage="data", event="bank", n=len(bank), split="train", seed=cfg.seed,
                  params={"vae": sum(p.numel() for p in vae.parameters())})
        train_vae(vae, pixels, cfg, out / "state" / "image-vae" / "vae.ckpt", log, control, "image_generator")
    return atomic_dir(out / "image-vae", lambda d: vae.save_pretrained(str(d), safe_serialization=True))


def train_image_generator(out: Path, cfg: ImageGeneratorPhase, log: JsonlLog, control: RunControl) -> Path:
    """The ``image-generator`` phase: the UNet and CLIP text encoder on the ``image-vae`` phase's
    latents, assembled with that VAE into a ``StableDiffusionPipeline`` in ``out / "image-generator"``."""
    from diffusers import AutoencoderKL

    state_dir = out / "state" / "image-generator"
    state_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(out)
    models = to_device(_build_image_models(cfg, tokenizer), control.device)
    vae, unet, text_encoder = models["vae"], models["unet"], models["text_encoder"]
    vae.load_state_dict(AutoencoderKL.from_pretrained(str(out / "image-vae")).state_dict())
    vae.eval().requires_grad_(False)

    bank, pixels = _image_bank(cfg)
    captions, extra_labels = list(bank.captions), None
    n_aug = int(round(cfg.augment_fraction * cfg.bank_size))
    if n_aug:  # appended after the world images, so bank.specs still label the first rows
        aug_pixels, aug_captions, aug_specs = augmented_image_bank(n_aug, cfg.seed + 7000)
        pixels, captions = torch.cat([pixels, aug_pixels]), captions + aug_captions
        extra_labels = field_labels(aug_specs, AUX_FIELDS)
        extra_labels[:, 0] = -100  # the colour is left unsaid (and unpainted)
    log.write(stage="data", event="bank", n=len(bank), augmented=n_aug, split="train", seed=cfg.seed,
              params={k: sum(p.numel() for p in m.parameters()) for k, m in models.items()})

    latents = encode_latents(vae, pixels, state_dir / "latents.pt", log, cfg.vae_steps,
                       lambda: _vae_reconstruction_scores(vae, bank))
    ids = token_ids(tokenizer, captions, cfg.prompt_length)
    empty = token_ids(tokenizer, [""], cfg.prompt_length)

    def condition(tokens: torch.Tensor) -> dict[str, Any]:
        return {"encoder_hidden_states": text_encoder(tokens)[0]}  # what StableDiffusionPipeline.encode_prompt does

    def evaluate(ema: EMA, n: int) -> dict[str, Any]:
        return eval_with_ema(models, ema, lambda m: _assemble_pipeline(m, tokenizer, cfg), evaluate_image_pipeline,
                             cfg, n)

    pooled = masked_mean_states(condition, tokenizer.pad_token_id)
    aux_head, aux_loss = caption_aux_loss(bank.specs, AUX_FIELDS, text_encoder.config.hidden_size, cfg, pooled,
                                          extra_labels)
    ema = train_denoiser(unet, text_encoder, condition, latents, ids, empty, cfg, state_dir / "unet.ckpt", log,
                          control, evaluate, aux_head, aux_loss)
    ema.copy_to([unet, text_encoder])  # save the EMA weights
    pipe = _assemble_pipeline(models, tokenizer, cfg)
    return atomic_dir(out / "image-generator", lambda d: pipe.save_pretrained(str(d), safe_serialization=True))


def _vae_reconstruction_scores(vae: Any, bank: world.Bank, n: int = 200) -> dict[str, float]:
    """Checker accuracy of VAE reconstructions (of the posterior mean): the ceiling of the diffusion model."""
    n = min(n, len(bank))
    with torch.no_grad():
        x = images_to_tensor(bank.data[:n]).to(device_of(vae))
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample
    images = tensor_to_images(recon)
    return score_images(list(images), bank.specs[:n])
