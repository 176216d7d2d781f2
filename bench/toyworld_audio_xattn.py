"""Does a UNet that attends to the caption's token states compose held-out note x waveform pairs?
python bench/toyworld_audio_xattn.py RUN_DIR OUT_DIR [steps] [eval_n] [augment_fraction]

The toy audio generator is AudioLDM v1's layout: the UNet hears the caption only as one pooled CLAP
vector (a class embedding), and it plays held-out note x waveform pairs (E4 sawtooth, G5 square) with
the wrong note (docs/toyworld.md). Issue 20 suggests sequence conditioning through cross-attention,
AudioLDM 2's layout. This probe asks the question at the phase level before the pipeline is built:

* the same data (RUN_DIR's train-split bank, its cached mel-VAE latents, its tokenizer and VAE), the
  same text tower (the recipe's ``ClapTextModelWithProjection``), UNet widths, schedule and EMA;
* the UNet's attention blocks cross-attend to the text tower's token states (width 64, padding
  masked) instead of the pooled vector entering as a class embedding;
* the recipe's caption aux loss, on the masked mean of those states (as the image recipe's).

Both generators are sampled the same way (DPM-Solver++ 20 steps, guidance 3, the empty caption as
the negative, the Griffin-Lim vocoder), on the phase's own evaluation prompts
(``audio_eval_specs(eval_n, seed + 1000)``), and scored by ``checkers.score_audio``. Training
checkpoints into OUT_DIR and resumes. Figures go to OUT_DIR/figures.json.

``augment_fraction`` (default 0) adds the recipe's off-world clips to the cross-attention UNet's data
(``audio_generator.augmented_audio_bank``: a world note in another timbre, or a world waveform off
the note grid, captioned without the field played off the world), encoded with the run's VAE.
"""
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from anymodal.modality import Modality
from anymodal.toyworld import world
from anymodal.toyworld.audio_generator import augmented_audio_bank, audio_eval_specs, log_mel_features, score_audios
from anymodal.toyworld.diffusion import (caption_aux_loss, masked_mean_states, noise_scheduler, text_config_kwargs,
                                         token_ids, train_denoiser)
from anymodal.toyworld.loop import JsonlLog, RunControl
from anymodal.toyworld.tokenizer import load_tokenizer
from anymodal.toyworld.train import ToyworldTrainConfig

if len(sys.argv) < 3:
    raise SystemExit(__doc__)
torch.set_num_threads(1)
run, out = Path(sys.argv[1]), Path(sys.argv[2])
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 1600
eval_n = int(sys.argv[4]) if len(sys.argv) > 4 else 40
augment = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
out.mkdir(parents=True, exist_ok=True)
cfg = ToyworldTrainConfig.preset("default").audio_generator
recorded = json.loads((run / "state/audio-generator/config.json").read_text())  # the run's own phase settings
if (recorded["bank_size"], recorded["prompt_length"]) != (cfg.bank_size, cfg.prompt_length):
    raise SystemExit(f"{run}: its audio phase used another bank or prompt length than today's recipe")
cfg = replace(cfg, steps=steps, eval_every=0, seed=recorded["seed"])  # the seed draws the bank its latents are of
if cfg.augment_fraction:
    raise SystemExit("the probe reads the bank without augmentation, as the recipe's default")

from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel  # noqa: E402
from transformers import ClapTextConfig, ClapTextModelWithProjection  # noqa: E402

from anymodal.generators.vocoders import GriffinLimVocoder  # noqa: E402

tokenizer = load_tokenizer(run)
pad = tokenizer.pad_token_id
bank = world.make_bank(Modality.AUDIO, cfg.bank_size, "train", seed=cfg.seed)
cached = torch.load(run / "state/audio-generator/latents.pt", map_location="cpu", weights_only=True)
latents = cached["latents"]
if len(latents) != len(bank):
    raise SystemExit(f"{run}: {len(latents)} cached latents for a bank of {len(bank)}")
vae = AutoencoderKL.from_pretrained(run / "audio-generator/vae").eval()
vocoder = GriffinLimVocoder(**cfg.vocoder)

text_cfg = text_config_kwargs(tokenizer, cfg.text_encoder)
width = text_cfg["hidden_size"]
unet_cfg = {k: v for k, v in cfg.unet.items()
            if k not in ("class_embed_type", "projection_class_embeddings_input_dim", "class_embeddings_concat")}
unet_cfg["cross_attention_dim"] = width
with torch.random.fork_rng(devices=[]):
    torch.manual_seed(cfg.seed)
    unet = UNet2DConditionModel(**unet_cfg)
    text_encoder = ClapTextModelWithProjection(ClapTextConfig(**text_cfg))


def condition(tokens: torch.Tensor) -> dict:
    mask = (tokens != pad).long()
    states = text_encoder(tokens, attention_mask=mask).last_hidden_state
    return {"encoder_hidden_states": states, "encoder_attention_mask": mask}


captions, extra_labels = list(bank.captions), None
n_aug = int(round(augment * cfg.bank_size))
if n_aug:  # as train_audio_generator: appended after the world clips, encoded as its latents were
    aug_waves, aug_captions, extra_labels = augmented_audio_bank(n_aug, cfg.seed + 7000)
    mels = log_mel_features(torch.from_numpy(aug_waves))[:, None]
    with torch.no_grad():
        means = torch.cat([vae.encode(mels[i:i + 256]).latent_dist.mean for i in range(0, len(mels), 256)])
    latents = torch.cat([latents, means * float(cached["scaling_factor"])])
    captions += aug_captions
ids = token_ids(tokenizer, captions, cfg.prompt_length)
empty = token_ids(tokenizer, [""], cfg.prompt_length)
fields_ = (("note", tuple(world.NOTES)), ("waveform", world.WAVEFORMS), ("duration", tuple(world.DURATIONS)))
aux_head, aux_loss = caption_aux_loss(bank.specs, fields_, width, cfg, masked_mean_states(condition, pad),
                                      extra_labels)
log = JsonlLog(out / "log.jsonl")
t0 = time.time()
ema = train_denoiser(unet, text_encoder, condition, latents, ids, empty, cfg, out / "unet.ckpt", log,
                     RunControl(progress=False), None, aux_head, aux_loss)
train_s = time.time() - t0
ema.copy_to([unet, text_encoder])
unet.eval(), text_encoder.eval()
params = sum(p.numel() for p in unet.parameters())


@torch.no_grad()
def sample(denoiser, cond_fn, captions: list[str], seed: int, n_steps: int = 20,
           guidance: float = 3.0) -> list[np.ndarray]:
    """What AudioLDMPipeline does (scaled initial noise, classifier-free guidance, VAE decode, vocoder),
    with ``denoiser`` given the conditioning keyword arguments from ``cond_fn(tokens)``."""
    sched = DPMSolverMultistepScheduler.from_config(noise_scheduler().config, steps_offset=1)
    sched.set_timesteps(n_steps)
    tok = token_ids(tokenizer, captions, cfg.prompt_length)
    cond, uncond = cond_fn(tok), cond_fn(empty.expand(len(captions), -1))
    both = {k: torch.cat([uncond[k], cond[k]]) if torch.is_tensor(cond[k]) else None for k in cond}
    g = torch.Generator().manual_seed(seed)
    shape = (len(captions), denoiser.config.in_channels, latents.shape[2], latents.shape[3])
    x = torch.randn(shape, generator=g) * sched.init_noise_sigma
    for t in sched.timesteps:
        inp = sched.scale_model_input(torch.cat([x, x]), t)
        u, c = denoiser(inp, t, **both).sample.chunk(2)
        x = sched.step(u + guidance * (c - u), t, x).prev_sample
    mel = vae.decode(x / vae.config.scaling_factor).sample[:, 0]
    return list(vocoder(mel).numpy()[:, : world.CLIP_SAMPLES])


figures = {"steps": steps, "train_s": round(train_s, 1), "unet_params": params, "eval_n": eval_n,
           "augment_fraction": augment, "augmented_clips": n_aug,
           "sampling": "DPM-Solver++ 20 steps, guidance 3, negative = empty caption"}
specs = audio_eval_specs(eval_n, cfg.seed + 1000)


def scores(denoiser, cond_fn) -> dict:
    return {split: score_audios(sample(denoiser, cond_fn, [s.caption() for s in ss], cfg.seed + 1000), ss)
            for split, ss in specs.items()}


figures["cross_attention"] = scores(unet, condition)
print("cross-attention:", json.dumps(figures["cross_attention"]), flush=True)

# the run's own generator (pooled CLAP vector as a class embedding), sampled by the same loop
base = run / "audio-generator"
base_unet = UNet2DConditionModel.from_pretrained(base / "unet").eval()
base_text = ClapTextModelWithProjection.from_pretrained(base / "text_encoder").eval()


def pooled_condition(tokens: torch.Tensor) -> dict:
    embeds = base_text(tokens, attention_mask=(tokens != pad).long()).text_embeds
    return {"encoder_hidden_states": None, "class_labels": torch.nn.functional.normalize(embeds, dim=-1)}


figures["pooled_class_embedding"] = scores(base_unet, pooled_condition)
print("pooled (the run's generator):", json.dumps(figures["pooled_class_embedding"]), flush=True)
(out / "figures.json").write_text(json.dumps(figures, indent=2) + "\n")
