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


def nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``argmin ||a @ x - b||`` over ``x >= 0``: scipy's ``nnls``, checked, with bounded least squares
    (``lsq_linear``, BVLS) where it fails.

    scipy 1.17's ``nnls`` now and then returns a wrong answer on the mel filterbank: on one frame of
    a real C6 sine's mel it gave weights of 2.3e7 on three bins near 7.5 kHz, whose fit is far worse
    than ``x = 0``. That one frame made the clip peak at 8e5 instead of 0.5, and a saver that
    normalises would have turned the tone into a click. Any true solution fits at least as well as
    ``x = 0``, so a solution that does not, or that is not finite, is recomputed."""
    from scipy import optimize

    x = optimize.nnls(a, b)[0]
    bound = np.linalg.norm(b) * (1.0 + 1e-6) + 1e-12
    if np.isfinite(x).all() and np.linalg.norm(a @ x - b) <= bound:
        return x
    return np.maximum(optimize.lsq_linear(a, b, bounds=(0.0, np.inf), method="bvls").x, 0.0)


class GriffinLimVocoder(ModelMixin, ConfigMixin):
    """``forward(spectrogram)``: ``(batch, frames, model_in_dim)`` (or ``(frames, model_in_dim)``)
    features ``(log(max(mel, mel_floor)) + mel_shift) / mel_scale`` -> ``(batch, frames * hop)``
    waveforms. Deterministic: the initial phase comes from ``seed``.

    ``peak_limit`` bounds the output, as the ``tanh`` at the end of a HiFi-GAN does, but with a gain
    rather than saturation, so the waveform's shape (and a sine's purity) is kept: a clip whose peak
    is above it is scaled down to it. A diffusion model's mels can be louder than any it was trained
    on (the toy world's A4 sine came out at a peak of 2-2.8, its world level is 0.4-0.6), and
    16-bit PCM holds [-1, 1]. ``None`` leaves the scale alone."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, model_in_dim: int = 64, sampling_rate: int = 16000, n_fft: int = 1024,
                 upsample_rates: tuple[int, ...] | list[int] = (256,), mel_shift: float = 3.0,
                 mel_scale: float = 6.0, mel_floor: float = 1e-5, n_iter: int = 32, seed: int = 0,
                 sub_bins: int = 8, peak_limit: float | None = 0.99):
        super().__init__()
        hop = int(np.prod(upsample_rates))
        if not 0 < hop <= n_fft:
            raise ValueError(f"the hop (product of upsample_rates = {hop}) must be in 1..n_fft ({n_fft})")
        if n_iter < 0 or model_in_dim < 1 or sub_bins < 1:
            raise ValueError(f"n_iter must be >= 0, model_in_dim and sub_bins >= 1, got {n_iter}, {model_in_dim} "
                             f"and {sub_bins}")
        if peak_limit is not None and not 0.0 < peak_limit <= 1.0:
            raise ValueError(f"peak_limit must be in (0, 1] (or None for no limit), got {peak_limit}")
        self.hop = hop
        basis = torch.tensor(mel_filterbank(model_in_dim, n_fft, sampling_rate), dtype=torch.float32)
        self.register_buffer("mel_basis", basis)  # (bands, n_fft // 2 + 1); gives the module a dtype and device

    def atoms(self) -> np.ndarray:
        """``(n_fft // 2 + 1, atoms)``: the magnitude spectrum of one Hann-windowed unit cosine at every
        ``1 / sub_bins`` of an FFT bin (with ``sub_bins`` 1: one bin each, the plain spectrum).

        Solving for bins alone puts every tone on a bin centre: 15.6 Hz apart at 16 kHz and n_fft
        1024, so C4 (261.6 Hz) came back at 250 Hz (B3) and G5 between bins. A non-negative mix of
        windowed cosines between the bins puts the peak where the mel energy says it is."""
        from scipy import signal

        c = self.config
        if getattr(self, "_atoms", None) is None:
            t = np.arange(c.n_fft)
            window = signal.get_window("hann", c.n_fft)
            freqs = np.arange(0, (c.n_fft // 2) * c.sub_bins + 1) / c.sub_bins  # in FFT bins
            atoms = np.abs(np.fft.rfft(window[None] * np.cos(2 * np.pi * np.outer(freqs, t) / c.n_fft), axis=1)).T
            atoms[atoms < 1e-4 * atoms.max()] = 0.0
            self._atoms = atoms
        return self._atoms

    def magnitudes(self, features: np.ndarray) -> np.ndarray:
        """(frames, bands) features -> (n_fft // 2 + 1, frames) magnitude spectrogram.

        Per frame, non-negative least squares first over the FFT bins (``mel_basis @ magnitude =
        mel``), then over the :meth:`atoms` within one bin of the bins that solution used, which
        moves each peak between bins to where the mel energy puts it. The refinement is kept only
        where it fits the mel at least as well (one NNLS over all atoms at once is both slower and,
        with scipy 1.17's solver, sometimes wrong on such nearly collinear columns)."""
        c = self.config
        fb = self.mel_basis.detach().cpu().double().numpy()
        atoms = self.atoms()
        mel = np.exp(np.asarray(features, dtype=np.float64) * c.mel_scale - c.mel_shift).T  # (bands, frames)
        mel[mel <= c.mel_floor * 1.0001] = 0.0  # the floor is silence, not a faint tone
        scale = max(float(mel.max()), 1e-12)  # nnls' tolerances are absolute
        out = np.zeros((fb.shape[1], mel.shape[1]))
        for j in range(mel.shape[1]):
            target = mel[:, j] / scale
            if not target.any():
                continue
            plain = nnls(fb, target)
            out[:, j] = plain
            if c.sub_bins == 1:
                continue
            used = np.nonzero(plain > 1e-6 * plain.max())[0]
            near = np.unique(np.clip((used[:, None] * c.sub_bins + np.arange(-c.sub_bins, c.sub_bins + 1)[None]).ravel(),
                                     0, atoms.shape[1] - 1))
            basis = fb @ atoms[:, near]
            w = nnls(basis, target)
            if np.linalg.norm(basis @ w - target) <= 0.25 * np.linalg.norm(target):
                out[:, j] = atoms[:, near] @ w
        return out * scale

    def waveform(self, features: np.ndarray, seed: int | None = None) -> np.ndarray:
        """One clip: (frames, bands) features -> (frames * hop,) float32 samples."""
        from scipy import signal

        c = self.config
        # The features are log-mels of an unnormalised STFT (``torch.stft``, as the front ends that
        # train against this vocoder compute them), whose magnitudes are the amplitude times the
        # window's sum / 2; scipy's STFT pair divides by the window's sum. Without this factor the
        # waveform comes out ``sum(window)`` (512 at n_fft 1024) times too loud: a clipped square wave.
        mag = self.magnitudes(features) / float(signal.get_window("hann", c.n_fft).sum())
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
        peak = float(np.abs(x).max()) if x.size else 0.0
        if c.peak_limit is not None and peak > c.peak_limit:
            x = x * (c.peak_limit / peak)
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

__all__ = ["GriffinLimVocoder", "mel_filterbank", "nnls"]
