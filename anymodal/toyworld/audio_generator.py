"""The ``audio-generator`` phase: a tiny AudioLDM on the world's tones.

The front end is a 64x64 log-mel spectrogram (:func:`log_mel_features`); a one-channel
``AutoencoderKL``, a ``UNet2DConditionModel`` conditioned through a class embedding on a tiny
``ClapTextModelWithProjection``, and the weightless
:class:`~anymodal.generators.vocoders.GriffinLimVocoder` make an ``AudioLDMPipeline`` saved to
``out/audio-generator`` and scored through anymodal's ``audioldm`` adapter.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..modality import Modality
from ..utils import atomic_write_text, quiet_loading
from . import checkers, world
from .diffusion import (caption_aux_loss, encode_latents, eval_with_ema, new_vae, noise_scheduler, text_config_kwargs,
                        to_device, token_ids, train_denoiser, train_vae)
from .loop import EMA, JsonlLog, RunControl, atomic_dir
from .recipe import AudioGeneratorPhase, MEL_BANDS, MEL_FLOOR, MEL_HOP, MEL_NFFT, MEL_SCALE, MEL_SHIFT
from .tokenizer import load_tokenizer


EVALUATION_NOTE = ("checkers.score_audio on prompts = spec.caption() of specs sampled from the train split "
                   "(seen) and from held-out note x waveform pairs (heldout); generated through the audioldm "
                   "adapter (its Griffin-Lim vocoder) with DPM-Solver++ and classifier-free guidance")


def log_mel_features(waves: torch.Tensor) -> torch.Tensor:
    """(B, CLIP_SAMPLES) waveforms -> (B, MEL_FRAMES, MEL_BANDS) normalised log-mel features:
    what the vocoder takes and what the mel VAE encodes (as a one-channel image)."""
    from ..generators.vocoders import mel_filterbank  # imports diffusers: only when needed

    window = torch.hann_window(MEL_NFFT)
    spec = torch.stft(waves, MEL_NFFT, MEL_HOP, window=window, center=True, return_complex=True).abs()
    spec = spec[..., : waves.shape[-1] // MEL_HOP]
    fb = torch.as_tensor(mel_filterbank(MEL_BANDS, MEL_NFFT, world.SAMPLE_RATE), dtype=spec.dtype)
    mel = torch.log(torch.clamp(fb @ spec, min=MEL_FLOOR))
    return ((mel + MEL_SHIFT) / MEL_SCALE).transpose(1, 2)


def _build_audio_models(cfg: AudioGeneratorPhase, tokenizer: Any) -> dict[str, torch.nn.Module]:
    from diffusers import UNet2DConditionModel
    from transformers import ClapTextConfig, ClapTextModelWithProjection

    from ..generators.vocoders import GriffinLimVocoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        vae = new_vae(cfg.vae)
        unet = UNet2DConditionModel(**cfg.unet)
        text_encoder = ClapTextModelWithProjection(ClapTextConfig(**text_config_kwargs(tokenizer, cfg.text_encoder)))
        vocoder = GriffinLimVocoder(**cfg.vocoder)
    return {"vae": vae, "unet": unet, "text_encoder": text_encoder, "vocoder": vocoder}


def _assemble_audio_pipeline(models: dict[str, torch.nn.Module], tokenizer: Any, cfg: AudioGeneratorPhase) -> Any:
    from diffusers import AudioLDMPipeline, DPMSolverMultistepScheduler

    tok = copy.deepcopy(tokenizer)
    tok.model_max_length = cfg.prompt_length
    scheduler = DPMSolverMultistepScheduler.from_config(noise_scheduler().config, steps_offset=1)
    with quiet_loading():
        pipe = AudioLDMPipeline(vae=models["vae"], text_encoder=models["text_encoder"], tokenizer=tok,
                                unet=models["unet"], scheduler=scheduler, vocoder=models["vocoder"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def augmented_audio_bank(n: int, seed: int) -> tuple[np.ndarray, list[str], torch.Tensor]:
    """``n`` train-split tones played off the world in one field, captioned without it: half keep
    their note and take an off-world timbre ("a low tone of e4 lasting one second"), half keep their
    waveform and go off the note grid ("a sawtooth tone lasting one second", with "low"/"high" when the
    pitch lies inside that register's range). Returns the clips, the captions and aux-loss labels
    (note, waveform, duration; ``-100`` for the field left unsaid). No held-out note x waveform pair
    is played: an off-grid pitch is at least 0.75 semitone from every world note."""
    from .encoder import off_grid_frequency, off_world_harmonics

    g = np.random.default_rng(seed)
    specs = world.sample_specs(Modality.AUDIO, n, g, "train")
    waves = np.zeros((n, world.CLIP_SAMPLES), dtype=np.float32)
    captions: list[str] = []
    labels = torch.full((n, 3), -100, dtype=torch.long)
    notes, lows = tuple(world.NOTES), world.REGISTERS["low"]
    top_low, bottom_high = max(world.NOTES[x] for x in lows), min(world.NOTES[x] for x in world.REGISTERS["high"])
    for i, s in enumerate(specs):
        labels[i, 2] = tuple(world.DURATIONS).index(s.duration)
        phrase = f"lasting {world.DURATION_PHRASES[s.duration]}"
        if i % 2 == 0:  # the note, another timbre
            waves[i] = world.render_audio(s, g, harmonics=off_world_harmonics(g))
            captions.append(f"a {s.register} tone of {s.note} {phrase}")
            labels[i, 0] = notes.index(s.note)
        else:  # the waveform, another pitch
            f0 = off_grid_frequency(g)
            waves[i] = world.render_audio(s, g, frequency=f0)
            register = "low " if f0 < top_low else "high " if f0 > bottom_high else ""
            captions.append(f"a {register}{s.waveform} tone {phrase}")
            labels[i, 1] = world.WAVEFORMS.index(s.waveform)
    return waves, captions, labels


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
            audios = gen.render(cond, rng=torch.Generator().manual_seed(seed))
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
    models = to_device(_build_audio_models(cfg, tokenizer), control.device)
    vae, unet, text_encoder, vocoder = (models[k] for k in ("vae", "unet", "text_encoder", "vocoder"))

    bank = world.make_bank(Modality.AUDIO, cfg.bank_size, "train", seed=cfg.seed)
    captions, extra_labels = list(bank.captions), None
    waves = torch.from_numpy(bank.data)
    n_aug = int(round(cfg.augment_fraction * cfg.bank_size))
    if n_aug:  # appended after the world clips, so bank.specs still label the first rows
        aug_waves, aug_captions, extra_labels = augmented_audio_bank(n_aug, cfg.seed + 7000)
        waves = torch.cat([waves, torch.from_numpy(aug_waves)])
        captions += aug_captions
    features = log_mel_features(waves)  # (N, frames, bands)
    log.write(stage="data", event="bank", n=len(bank), augmented=n_aug, split="train", seed=cfg.seed,
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

    train_vae(vae, mels, cfg, state_dir / "vae.ckpt", log, control, "audio_generator")
    latents = encode_latents(vae, mels, state_dir / "latents.pt", log, cfg.vae_steps, reconstruction)

    # ---------------------------------------------------------------- 3. UNet + CLAP text encoder
    ids = token_ids(tokenizer, captions, cfg.prompt_length)
    empty = token_ids(tokenizer, [""], cfg.prompt_length)
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
    aux_head, aux_loss = caption_aux_loss(bank.specs, fields_, text_encoder.config.projection_dim, cfg, pooled,
                                          extra_labels)

    ema = train_denoiser(unet, text_encoder, condition, latents, ids, empty, cfg, state_dir / "unet.ckpt", log,
                          control, evaluate, aux_head, aux_loss)
    ema.copy_to([unet, text_encoder])
    pipe = _assemble_audio_pipeline(models, tokenizer, cfg)
    return atomic_dir(out / "audio-generator", lambda d: pipe.save_pretrained(str(d), safe_serialization=True))
