"""Vocoders anymodal provides itself, for diffusers audio pipelines (beside transformers' HiFi-GAN).

``GriffinLimVocoder`` sits in an ``AudioLDMPipeline`` where the HiFi-GAN would. It turns log-mel
spectrograms into waveforms with no learned weights: per frame, the magnitude spectrum is the
non-negative least-squares solution of ``mel_basis @ magnitude = mel`` (a pseudo-inverse moves
low peaks by up to a tone), then Griffin-Lim rebuilds the phase. On the world's real mels it keeps
the pitch of every tone (``anymodal.toyworld.checkers``), which a briefly trained
``SpeechT5HifiGan`` did not (docs/toyworld.md). It is a ``ModelMixin``, so ``save_pretrained``
and ``from_pretrained`` of the pipeline keep it (``model_index.json`` names this module), and it
has the config fields the AudioLDM pipelines read: ``model_in_dim``, ``sampling_rate`` and
``upsample_rates`` (whose product is the hop).

diffusers loads a component of another library only once that library's module is imported, so
the audio adapters list this module in their ``component_modules``, which ``DiffusersGenerator``
imports before it loads a pipeline. Pipelines saved before the vocoder moved here name
``anymodal.toyworld.vocoder`` in their ``model_index.json`` (the shipped default model does):
importing this module registers it under that name too.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

LEGACY_MODULE = "anymodal.toyworld.vocoder"  # where saved pipelines from before the move look for it


def mel_filterbank(n_mels: int, n_fft: int, sample_rate: int) -> np.ndarray:
    """HTK-mel triangular filters without normalisation (torchaudio's MelScale defaults):
    ``(n_mels, n_fft // 2 + 1)``."""
    def mel(f: np.ndarray) -> np.ndarray:
        return 2595.0 * np.log10(1.0 + f / 700.0)

    freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    pts = 700.0 * (10 ** (np.linspace(0.0, mel(np.array(sample_rate / 2.0)), n_mels + 2) / 2595.0) - 1.0)
    lower, centre, upper = pts[:-2, None], pts[1:-1, None], pts[2:, None]
    up = (freqs[None] - lower) / (centre - lower)
    down = (upper - freqs[None]) / (upper - centre)
    return np.maximum(0.0, np.minimum(up, down))


class GriffinLimVocoder(ModelMixin, ConfigMixin):
    """``forward(spectrogram)``: ``(batch, frames, model_in_dim)`` (or ``(frames, model_in_dim)``)
    features ``(log(max(mel, mel_floor)) + mel_shift) / mel_scale`` -> ``(batch, frames * hop)``
    waveforms. Deterministic: the initial phase comes from ``seed``."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, model_in_dim: int = 64, sampling_rate: int = 16000, n_fft: int = 1024,
                 upsample_rates: tuple[int, ...] | list[int] = (256,), mel_shift: float = 3.0,
                 mel_scale: float = 6.0, mel_floor: float = 1e-5, n_iter: int = 32, seed: int = 0):
        super().__init__()
        hop = int(np.prod(upsample_rates))
        if not 0 < hop <= n_fft:
            raise ValueError(f"the hop (product of upsample_rates = {hop}) must be in 1..n_fft ({n_fft})")
        if n_iter < 0 or model_in_dim < 1:
            raise ValueError(f"n_iter must be >= 0 and model_in_dim >= 1, got {n_iter} and {model_in_dim}")
        self.hop = hop
        basis = torch.tensor(mel_filterbank(model_in_dim, n_fft, sampling_rate), dtype=torch.float32)
        self.register_buffer("mel_basis", basis)  # (bands, n_fft // 2 + 1); gives the module a dtype and device

    def magnitudes(self, features: np.ndarray) -> np.ndarray:
        """(frames, bands) features -> (n_fft // 2 + 1, frames) magnitude spectrogram (NNLS per frame)."""
        from scipy import optimize

        c = self.config
        fb = self.mel_basis.detach().cpu().double().numpy()
        mel = np.exp(np.asarray(features, dtype=np.float64) * c.mel_scale - c.mel_shift).T  # (bands, frames)
        mel[mel <= c.mel_floor * 1.0001] = 0.0  # the floor is silence, not a faint tone
        scale = max(float(mel.max()), 1e-12)  # nnls' tolerances are absolute
        return np.stack([optimize.nnls(fb, mel[:, j] / scale)[0] for j in range(mel.shape[1])], axis=1) * scale

    def waveform(self, features: np.ndarray, seed: int | None = None) -> np.ndarray:
        """One clip: (frames, bands) features -> (frames * hop,) float32 samples."""
        from scipy import signal

        c = self.config
        mag = self.magnitudes(features)
        mag = np.concatenate([mag, mag[:, -1:]], axis=1)  # a centred STFT of frames * hop samples has one more frame
        n = (mag.shape[1] - 1) * self.hop
        kw = dict(fs=c.sampling_rate, window="hann", nperseg=c.n_fft, noverlap=c.n_fft - self.hop)
        rng = np.random.default_rng(c.seed if seed is None else seed)
        phase = np.exp(2j * np.pi * rng.random(mag.shape))
        x = np.zeros(n)
        for i in range(c.n_iter + 1):
            x = signal.istft(mag * phase, **kw)[1][:n]
            x = np.pad(x, (0, max(0, n - len(x))))
            if i < c.n_iter:
                phase = np.exp(1j * np.angle(signal.stft(x, **kw)[2][:, : mag.shape[1]]))
        return x.astype(np.float32)

    @torch.no_grad()
    def forward(self, spectrogram: torch.Tensor) -> torch.Tensor:
        if spectrogram.ndim not in (2, 3) or spectrogram.shape[-1] != self.config.model_in_dim:
            raise ValueError(f"expected features of shape (batch, frames, {self.config.model_in_dim}), "
                             f"got {tuple(spectrogram.shape)}")
        batch = spectrogram[None] if spectrogram.ndim == 2 else spectrogram
        feats = batch.detach().float().cpu().numpy()
        waves = torch.from_numpy(np.stack([self.waveform(f) for f in feats]))
        waves = waves.to(device=spectrogram.device)
        return waves[0] if spectrogram.ndim == 2 else waves


sys.modules.setdefault(LEGACY_MODULE, sys.modules[__name__])

__all__ = ["GriffinLimVocoder", "mel_filterbank"]
