"""What the generator phases (image, audio, video) share: the VAE, then a denoiser on its latents.

:func:`train_vae` trains an ``AutoencoderKL`` to reconstruct (L1 + MSE plus a small KL, as in Stable
Diffusion's first stage, on random crops); :func:`encode_latents` encodes the training bank once;
:func:`train_denoiser` trains the UNet and its text encoder jointly (v-prediction cosine DDPM,
AdamW with warm-up then cosine, EMA, caption dropout), all through :func:`~.loop.train_loop`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import world
from .loop import EMA, JsonlLog, RunControl, atomic_save, cosine_lr, device_of, optimizer_step, train_loop


def images_to_tensor(data: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [-1, 1], what Stable Diffusion's VAE takes."""
    return torch.from_numpy(data).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def tensor_to_images(x: torch.Tensor) -> np.ndarray:
    """The inverse of :func:`images_to_tensor`: (N, 3, H, W) in [-1, 1] (clamped) -> (N, H, W, 3) uint8."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def token_ids(tokenizer: Any, texts: list[str], length: int) -> torch.Tensor:
    return tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")["input_ids"]


def text_config_kwargs(tokenizer: Any, overrides: dict[str, Any]) -> dict[str, Any]:
    """A text encoder config's kwargs: vocabulary size and special ids from the word-level tokenizer,
    then the phase's ``overrides`` (sizes)."""
    return {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, **overrides}


def new_vae(spec: dict[str, Any]) -> Any:
    """A fresh ``AutoencoderKL(**spec)`` (drawing from torch's global generator) whose posterior starts
    nearly deterministic (std e^-6): a fresh VAE's std of 1 buries the means under noise, and a short
    training run then learns only blurry averages. The KL term may still widen it; the pipelines
    decode the latents they are given."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**spec)
    if vae.quant_conv is not None:
        c = vae.config.latent_channels
        with torch.no_grad():
            vae.quant_conv.weight[c:].zero_()
            vae.quant_conv.bias[c:].fill_(-12.0)
    return vae


def noise_scheduler() -> Any:
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")


def to_device(models: dict[str, torch.nn.Module], device: str) -> dict[str, torch.nn.Module]:
    """Move every model of a phase to ``device`` (built on the CPU, so the same initial weights everywhere)."""
    for m in models.values():
        m.to(device)
    return models


def train_vae(vae: Any, data: torch.Tensor, cfg: Any, ckpt: Path, log: JsonlLog, control: RunControl,
               where: str) -> None:
    """Train ``vae`` to reconstruct ``data`` (N, C, H, W) on random crops: L1 + MSE + a small KL."""
    gen = torch.Generator().manual_seed(cfg.seed)  # on the CPU: the same draws on every device
    device = device_of(vae)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    grid = 2 ** (len(vae.config.block_out_channels) - 1)
    crop = min(cfg.vae_crop, data.shape[-1], data.shape[-2])
    if crop % grid:
        raise ValueError(f"{where}.vae_crop ({crop}) must be a multiple of the VAE's downsampling ({grid})")

    def vae_step(step: int) -> float:
        idx = torch.randint(len(data), (cfg.vae_batch_size,), generator=gen)
        x = data[idx].to(device)
        if crop < x.shape[-1] or crop < x.shape[-2]:
            y0, x0 = (torch.randint((x.shape[-1] - crop) // grid + 1, (2,), generator=gen) * grid).tolist()
            x = x[:, :, y0:y0 + crop, x0:x0 + crop]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + cfg.kl_weight * posterior.kl().mean()
        return optimizer_step(opt, loss)

    train_loop(stage="vae", total=cfg.vae_steps, ckpt=ckpt, modules={"vae": vae}, optimizer=opt,
               gen=gen, ema=None, step_fn=vae_step,
               lr_fn=lambda s: cosine_lr(s, cfg.vae_steps, cfg.vae_lr, min(cfg.warmup_steps, cfg.vae_steps // 10)),
               log=log, checkpoint_every=cfg.checkpoint_every, log_every=cfg.log_every, control=control)
    vae.eval().requires_grad_(False)


def encode_latents(vae: Any, data: torch.Tensor, path: Path, log: JsonlLog, step: int,
             reconstruction: Callable[[], dict[str, Any]]) -> torch.Tensor:
    """Encode ``data`` once (posterior means, scaled to unit variance, on the CPU; cached in ``path``) and
    set the VAE's ``scaling_factor``. ``reconstruction()`` scores the VAE when the cache is first made."""
    if path.exists():
        cached = torch.load(path, map_location="cpu", weights_only=True)
        latents, scaling = cached["latents"], float(cached["scaling_factor"])
    else:
        with torch.no_grad():
            device = device_of(vae)
            means = torch.cat([vae.encode(data[i:i + 256].to(device)).latent_dist.mean.cpu()
                               for i in range(0, len(data), 256)])
        scaling = float(1.0 / means.std())
        latents = means * scaling
        log.write(stage="vae", step=step, event="latents", scaling_factor=scaling,
                  latent_mean=float(latents.mean()), reconstruction=reconstruction())
        atomic_save({"latents": latents, "scaling_factor": scaling}, path)
    vae.register_to_config(scaling_factor=scaling)
    return latents


def train_denoiser(unet: Any, text_encoder: Any, condition: Callable[[torch.Tensor], dict[str, Any]],
                    latents: torch.Tensor, ids: torch.Tensor, empty: torch.Tensor, cfg: Any, ckpt: Path,
                    log: JsonlLog, control: RunControl,
                    evaluate: Callable[[EMA, int], dict[str, Any]] | None,
                    aux_head: torch.nn.Module | None = None,
                    aux_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> EMA:
    """Train the UNet and the text encoder jointly (v-prediction DDPM), returning the EMA.

    ``condition(tokens)`` returns the UNet's conditioning keyword arguments exactly as the
    pipeline computes them from the tokenizer's ids; captions are replaced by the empty prompt
    (the pipeline's negative prompt) with probability ``caption_dropout``. ``aux_loss(tokens,
    idx)`` (with its training-only ``aux_head``, checkpointed but not saved in the pipeline) is
    added to the loss for the rows whose caption was kept.
    """
    noise_sched = noise_scheduler()
    device = device_of(unet)
    if aux_head is not None:
        aux_head.to(device)
    trainable = [unet, text_encoder]
    params = [p for m in trainable for p in m.parameters()]
    params += list(aux_head.parameters()) if aux_head is not None else []
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = EMA(trainable, cfg.ema_decay)
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # on the CPU: the same draws on every device
    n_train = noise_sched.config.num_train_timesteps

    def unet_step(step: int) -> float:
        idx = torch.randint(len(latents), (cfg.batch_size,), generator=gen)
        x0 = latents[idx]
        tokens = ids[idx].clone()
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.caption_dropout
        tokens[drop] = empty
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(n_train, (cfg.batch_size,), generator=gen)
        x0, noise, t, tokens = x0.to(device), noise.to(device), t.to(device), tokens.to(device)
        noisy = noise_sched.add_noise(x0, noise, t)
        target = noise_sched.get_velocity(x0, noise, t)
        pred = unet(noisy, t, **condition(tokens)).sample
        loss = F.mse_loss(pred, target)
        if aux_loss is not None and bool((~drop).any()):
            keep = ~drop
            loss = loss + aux_loss(tokens[keep.to(device)], idx[keep])
        return optimizer_step(opt, loss, params)

    def periodic_eval(step: int) -> None:
        if evaluate is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            log.write(stage="unet", step=step, event="eval", prompts_per_split=cfg.eval_prompts,
                      **evaluate(ema, cfg.eval_prompts))

    modules = {"unet": unet, "text_encoder": text_encoder} | ({"aux_head": aux_head} if aux_head is not None else {})
    train_loop(stage="unet", total=cfg.steps, ckpt=ckpt, modules=modules, optimizer=opt, gen=gen, ema=ema, step_fn=unet_step,
               lr_fn=lambda s: cosine_lr(s, cfg.steps, cfg.lr, cfg.warmup_steps), log=log,
               checkpoint_every=cfg.checkpoint_every, log_every=cfg.log_every, control=control,
               on_step=periodic_eval)
    return ema


def eval_with_ema(models: dict[str, torch.nn.Module], ema: EMA, assemble: Callable[[dict[str, torch.nn.Module]], Any],
                  evaluate_pipeline: Callable[..., dict[str, Any]], cfg: Any, n: int) -> dict[str, Any]:
    """Evaluate the EMA weights of ``unet`` and ``text_encoder`` on copies (the training weights stay
    untouched): ``evaluate_pipeline(assemble(copies), n, seed, steps, guidance)``."""
    copies = {k: copy.deepcopy(m).eval() for k, m in models.items()}
    ema.copy_to([copies["unet"], copies["text_encoder"]])
    return evaluate_pipeline(assemble(copies), n, cfg.seed + 1000, cfg.sample_steps, cfg.guidance_scale)


def masked_mean_states(condition: Callable[[torch.Tensor], dict[str, Any]], pad: int
                       ) -> Callable[[torch.Tensor], torch.Tensor]:
    """The features of a generator's caption aux loss: the mean of the states the UNet attends to
    (``condition(tokens)["encoder_hidden_states"]``), padding left out."""
    def pooled(tokens: torch.Tensor) -> torch.Tensor:
        hidden = condition(tokens)["encoder_hidden_states"]
        mask = (tokens != pad).unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1)
    return pooled


def field_labels(specs: Sequence[world.Spec], fields_: Sequence[tuple[str, Sequence[str]]]) -> torch.Tensor:
    """``(len(specs), len(fields_))`` indices: each spec's value of each field (name, values) among its values."""
    return torch.tensor([[values.index(getattr(sp, name)) for name, values in fields_] for sp in specs])


def caption_aux_loss(specs: Sequence[world.Spec], fields_: Sequence[tuple[str, Sequence[str]]], dim: int, cfg: Any,
                     features: Callable[[torch.Tensor], torch.Tensor], extra_labels: torch.Tensor | None = None
                     ) -> tuple[torch.nn.Module | None, Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None]:
    """The auxiliary text loss of the generator phases (``cfg.text_aux_weight``; ``(None, None)`` at 0):
    a training-only linear head on ``features(tokens)`` (``dim`` wide) predicts each caption's
    ``fields_`` (name, values), so that a from-scratch text encoder keeps them apart.
    ``extra_labels`` (rows after ``specs``', one column per field, ``-100`` where the caption does not
    name that field) labels captions that are not a spec's (augmented data)."""
    if cfg.text_aux_weight <= 0:
        return None, None
    labels = field_labels(specs, fields_)
    if extra_labels is not None:
        labels = torch.cat([labels, extra_labels.to(labels.dtype)])
    sizes = [len(values) for _, values in fields_]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 4)
        head = torch.nn.Linear(dim, sum(sizes))

    def loss(tokens: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        logits = torch.split(head(features(tokens)), sizes, dim=-1)
        total = torch.zeros((), device=logits[0].device)
        for k, z in enumerate(logits):
            target = labels[idx, k].to(z.device)
            if bool((target != -100).any()):  # a batch whose captions never name this field adds nothing
                total = total + F.cross_entropy(z, target, ignore_index=-100)
        return cfg.text_aux_weight * total

    return head, loss
