"""VGGish (Hershey et al., ICASSP 2017), the feature network of the Fréchet Audio Distance.

FAD as Kilgour et al. define it (google-research ``frechet_audio_distance``) and as the
text-to-audio papers compute it (AudioLDM's ``audioldm_eval``, gudgud96's
``frechet_audio_distance``, both over harritaylor's ``torchvggish`` port) is the Fréchet distance
between Gaussians fitted to the VGGish embeddings of every 0.96 s example of the reference clips
and of the generated ones. The embedding is the *raw, pre-activation* output of the 128-wide
layer: no final ReLU and no PCA / 8-bit quantisation (the AudioSet release post-processing), as
``vggish/embedding`` in the TensorFlow model the FAD reference runs, and as the PyTorch FAD code
gets it by dropping torchvggish's last ReLU and turning its post-processor off.

The front end is VGGish's own (``vggish_input.waveform_to_examples``): mono, 16 kHz (other rates
resampled with resampy's ``kaiser_best`` filter, rebuilt here from its parameters), magnitude STFT
with a 25 ms periodic Hann window every 10 ms zero-padded to a 512-point FFT, 64 HTK-mel bands over
125–7500 Hz, ``log(mel + 0.01)``, cut into non-overlapping examples of 96 frames. It is computed
in float64, as the NumPy reference does. Weights load from a local file in the layout of
torchvggish's release ``vggish-10086976.pth`` (``features.{0,3,6,8,11,13}``,
``embeddings.{0,2,4}``), read with ``torch.load(weights_only=True)`` or safetensors.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

SAMPLE_RATE = 16000
WINDOW_SECONDS = 0.025
HOP_SECONDS = 0.010
NUM_BANDS = 64
MEL_MIN_HZ = 125.0
MEL_MAX_HZ = 7500.0
LOG_OFFSET = 0.01
EXAMPLE_FRAMES = 96  # 0.96 s of 10 ms frames per example, examples do not overlap
# HTK's mel scale: 1127 ln(1 + f / 700)
MEL_BREAK_HZ = 700.0
MEL_HIGH_Q = 1127.0

WINDOW = int(round(SAMPLE_RATE * WINDOW_SECONDS))  # 400 samples
HOP = int(round(SAMPLE_RATE * HOP_SECONDS))  # 160 samples
FFT = 1 << (WINDOW - 1).bit_length()  # 512: the next power of two
MIN_SAMPLES = WINDOW + (EXAMPLE_FRAMES - 1) * HOP  # 15600 samples (0.975 s) make the first example

WEIGHTS_HELP = ("torchvggish's VGGish weights vggish-10086976.pth, from "
                "https://github.com/harritaylor/torchvggish/releases/download/v0.1/vggish-10086976.pth "
                "(a port of Google's AudioSet vggish_model.ckpt); a .safetensors with the same keys works too")

# Positions of the weight layers in the torchvggish Sequentials (ReLUs and max-pools between them).
CONV_INDICES = (0, 3, 6, 8, 11, 13)
POOL_AFTER = (0, 1, 3, 5)  # the four max-pools follow these convolutions (of the six)
FC_INDICES = (0, 2, 4)
FULL_CHANNELS = (64, 128, 256, 256, 512, 512)
FULL_HIDDEN = 4096
EMBEDDING_SIZE = 128
# 96 x 64 input halved by four 2x2 pools
OUT_FRAMES, OUT_BANDS = EXAMPLE_FRAMES // 16, NUM_BANDS // 16


# The resampler of the reference front end: resampy's "kaiser_best" filter (resampy 0.4.3,
# data/kaiser_best.npz), the right half of a Kaiser-windowed sinc with 50 zero crossings and 2**13
# table entries per crossing. Rebuilt from these parameters it equals the stored table to 3e-16.
RESAMPLE_ZEROS = 50
RESAMPLE_TABLE = 2 ** 13
RESAMPLE_ROLLOFF = 0.9173473712608761
RESAMPLE_BETA = 12.984585247040012


# ==================================================================== front end
@lru_cache(maxsize=1)
def _kaiser_best() -> np.ndarray:
    n = RESAMPLE_TABLE * RESAMPLE_ZEROS
    x = np.linspace(0.0, RESAMPLE_ZEROS, n + 1)
    return RESAMPLE_ROLLOFF * np.sinc(RESAMPLE_ROLLOFF * x) * np.kaiser(2 * n + 1, RESAMPLE_BETA)[n:]


def resample(x: np.ndarray, rate: int, target: int, chunk: int = 2048) -> np.ndarray:
    """Band-limited resampling of a 1-D signal, equal to resampy's ``resample(x, rate, target)``
    (``kaiser_best``), which the reference front end uses.

    Output sample ``t`` sits at input time ``t * rate / target``; it is the sum of the input
    samples on either side weighted by the windowed sinc (stretched to the lower Nyquist when
    downsampling), read from the filter table with linear interpolation between entries. There are
    ``int(len(x) * target / rate)`` outputs."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"resample takes a 1-D signal, got shape {x.shape}")
    if rate <= 0 or target <= 0:
        raise ValueError(f"sample rates must be positive, got {rate} and {target}")
    if rate == target:
        return x.copy()
    ratio = float(target) / rate
    n_out = int(len(x) * float(target) / float(rate))
    if n_out < 1:
        raise ValueError(f"{len(x)} samples are too few to resample from {rate} to {target} Hz")
    win = _kaiser_best() * ratio if ratio < 1 else _kaiser_best()
    delta = np.diff(win, append=win[-1])
    scale = min(1.0, ratio)
    step = int(scale * RESAMPLE_TABLE)
    times = np.arange(n_out) * (1.0 / ratio)
    y = np.zeros(n_out)
    for a in range(0, n_out, chunk):
        t = times[a:a + chunk]
        n = t.astype(np.int64)
        frac = scale * (t - n)
        for left in (True, False):  # the input samples at and before t, then those after it
            index = (frac if left else scale - frac) * RESAMPLE_TABLE
            offset = index.astype(np.int64)
            eta = index - offset
            count = np.minimum(n + 1 if left else len(x) - n - 1, (len(win) - offset) // step)
            taps = np.arange(max(int(count.max()), 0))
            valid = taps < count[:, None]
            pos = np.where(valid, offset[:, None] + taps * step, 0)
            src = np.where(valid, n[:, None] - taps if left else n[:, None] + 1 + taps, 0)
            y[a:a + chunk] += np.where(valid, (win[pos] + eta[:, None] * delta[pos]) * x[src], 0.0).sum(axis=1)
    return y


def _hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    return MEL_HIGH_Q * np.log1p(np.asarray(hz, dtype=np.float64) / MEL_BREAK_HZ)


def mel_matrix(num_bins: int = FFT // 2 + 1, sample_rate: int = SAMPLE_RATE, bands: int = NUM_BANDS,
               low_hz: float = MEL_MIN_HZ, high_hz: float = MEL_MAX_HZ) -> np.ndarray:
    """``(num_bins, bands)`` triangular HTK-mel weights: band ``i`` rises linearly (in mel) from
    edge ``i`` to its centre ``i + 1`` and falls to edge ``i + 2`` of ``bands + 2`` edges evenly
    spaced in mel over ``[low_hz, high_hz]``; the DC bin gets no weight (as HTK)."""
    if not 0 <= low_hz < high_hz <= sample_rate / 2:
        raise ValueError(f"mel bands need 0 <= low ({low_hz}) < high ({high_hz}) <= Nyquist ({sample_rate / 2})")
    bin_mel = _hz_to_mel(np.linspace(0.0, sample_rate / 2, num_bins))[:, None]
    edges = np.linspace(_hz_to_mel(low_hz), _hz_to_mel(high_hz), bands + 2)
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (bin_mel - lower) / (centre - lower)
    falling = (upper - bin_mel) / (upper - centre)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights[0] = 0.0
    return weights


def log_mel(wave: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``(frames, 64)`` float64 log-mel spectrogram of a mono 16 kHz waveform (no padding: only
    whole 25 ms windows)."""
    x = torch.as_tensor(np.asarray(wave, dtype=np.float64))
    if x.ndim != 1:
        raise ValueError(f"log_mel takes a mono waveform (samples,), got shape {tuple(x.shape)}")
    if x.numel() < WINDOW:
        return torch.zeros(0, NUM_BANDS, dtype=torch.float64)
    n = torch.arange(WINDOW, dtype=torch.float64)
    hann = 0.5 - 0.5 * torch.cos(2 * torch.pi * n / WINDOW)  # periodic Hann
    frames = x.unfold(0, WINDOW, HOP) * hann
    magnitude = torch.fft.rfft(frames, n=FFT).abs()
    return torch.log(magnitude @ torch.from_numpy(mel_matrix()) + LOG_OFFSET)


def to_mono(wave: np.ndarray | torch.Tensor) -> np.ndarray:
    """A float64 mono waveform: 1-D as it is, ``(samples, channels)`` averaged over channels."""
    x = np.asarray(wave, dtype=np.float64)
    if x.ndim == 2:
        return x.mean(axis=1)
    if x.ndim != 1:
        raise ValueError(f"a waveform is (samples,) or (samples, channels), got shape {x.shape}")
    return x


def waveform_to_examples(wave: np.ndarray | torch.Tensor, sample_rate: int) -> torch.Tensor:
    """VGGish's input: ``(examples, 1, 96, 64)`` float64 log-mel patches of consecutive,
    non-overlapping 0.96 s; a clip shorter than 0.975 s gives none. ``wave`` is ``(samples,)`` or
    ``(samples, channels)``; another sample rate is resampled to 16 kHz first (:func:`resample`,
    as the reference)."""
    x = to_mono(wave)
    if not np.isfinite(x).all():
        raise ValueError("the waveform holds NaN or infinite values")
    if int(len(x) * float(SAMPLE_RATE) / float(sample_rate)) < MIN_SAMPLES:  # no whole example once at 16 kHz
        return torch.zeros(0, 1, EXAMPLE_FRAMES, NUM_BANDS, dtype=torch.float64)
    if sample_rate != SAMPLE_RATE:
        x = resample(x, int(sample_rate), SAMPLE_RATE)
    mel = log_mel(x)
    count = mel.shape[0] // EXAMPLE_FRAMES
    return mel[:count * EXAMPLE_FRAMES].reshape(count, 1, EXAMPLE_FRAMES, NUM_BANDS)


# ==================================================================== network
class VGGish(nn.Module):
    """VGG configuration A cut to four conv groups on 96x64 log-mel patches, three fully connected
    layers to a 128-d embedding; returns the pre-activation embedding (FAD's features).

    Widths default to the released model's; other widths (read from a weights file) serve tests."""

    def __init__(self, channels: Sequence[int] = FULL_CHANNELS, hidden: int = FULL_HIDDEN,
                 embedding_size: int = EMBEDDING_SIZE):
        super().__init__()
        if len(channels) != len(CONV_INDICES) or min(channels) < 1 or hidden < 1 or embedding_size < 1:
            raise ValueError(f"VGGish needs six positive conv widths and positive sizes, got {tuple(channels)}, "
                             f"{hidden}, {embedding_size}")
        layers: list[nn.Module] = []
        cin = 1
        for i, c in enumerate(channels):
            layers += [nn.Conv2d(cin, c, kernel_size=3, padding=1), nn.ReLU()]
            if i in POOL_AFTER:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            cin = c
        self.features = nn.Sequential(*layers)
        self.embeddings = nn.Sequential(nn.Linear(cin * OUT_FRAMES * OUT_BANDS, hidden), nn.ReLU(),
                                        nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, embedding_size))
        self.num_features = embedding_size
        self.sizes = (tuple(channels), hidden, embedding_size)

    def forward(self, examples: torch.Tensor) -> torch.Tensor:
        """``(N, 1, 96, 64)`` log-mel examples to ``(N, embedding_size)`` embeddings."""
        x = self.features(examples)
        # flatten frames, bands, channels in that order: the TensorFlow model's NHWC layout, which
        # the released fully connected weights expect
        return self.embeddings(x.permute(0, 2, 3, 1).flatten(1))

    @torch.no_grad()
    def embed(self, clips: Sequence[tuple[np.ndarray, int]], batch_size: int = 64) -> list[torch.Tensor]:
        """Per ``(waveform, sample_rate)`` clip, the float64 ``(examples, embedding_size)``
        embeddings of its 0.96 s examples (none for a clip shorter than 0.975 s)."""
        p = next(self.parameters())
        per_clip = [waveform_to_examples(w, sr) for w, sr in clips]
        flat = torch.cat(per_clip) if per_clip else torch.zeros(0, 1, EXAMPLE_FRAMES, NUM_BANDS, dtype=torch.float64)
        out = [self(flat[i:i + batch_size].to(device=p.device, dtype=p.dtype)).double().cpu()
               for i in range(0, len(flat), batch_size)]
        emb = torch.cat(out) if out else torch.zeros(0, self.num_features, dtype=torch.float64)
        return list(emb.split([len(e) for e in per_clip]))

    @classmethod
    def from_file(cls, path: str | Path | None, flag: str = "--vggish-weights", task: str = "t2a") -> "VGGish":
        """The network with the weights of a local ``.pth`` (torchvggish layout) or ``.safetensors``."""
        if path is None:
            raise ValueError(f"{task} FAD over VGGish needs {flag} FILE: {WEIGHTS_HELP}")
        state = read_state(path, flag)
        net = cls(**_sizes(state, path, flag))
        missing, unexpected = net.load_state_dict(state, strict=False)
        if missing or unexpected:  # _sizes has checked every key; kept as a guard
            raise ValueError(f"{flag} {path}: keys do not fit VGGish (missing {missing}, unexpected {unexpected})")
        return net.eval()


def read_state(path: str | Path, flag: str = "--vggish-weights") -> dict[str, torch.Tensor]:
    """A state dict of tensors from ``path``, never running code from it: safetensors, or
    ``torch.load(weights_only=True)``. torchvggish's own ``VGGish`` post-processor keys
    (``pproc.*``) are dropped: FAD uses the raw embedding."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {path}: no such file; expected {WEIGHTS_HELP}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{flag} {path}: not a plain PyTorch state dict or safetensors file "
                         f"({type(e).__name__}); expected {WEIGHTS_HELP}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ValueError(f"{flag} {path}: not a state dict of tensors; expected {WEIGHTS_HELP}")
    if "pca_eigen_vectors" in state or "pca_means" in state:
        raise ValueError(f"{flag} {path}: this is VGGish's PCA file (vggish_pca_params); FAD uses the raw "
                         f"embedding and needs the network: {WEIGHTS_HELP}")
    return {k: v.float() for k, v in state.items() if not k.startswith("pproc.")}


def _sizes(state: dict[str, torch.Tensor], path: str | Path, flag: str) -> dict:
    """The widths a state dict holds, each tensor's shape checked against the VGGish layout."""
    expected = {f"features.{i}.{p}" for i in CONV_INDICES for p in ("weight", "bias")}
    expected |= {f"embeddings.{i}.{p}" for i in FC_INDICES for p in ("weight", "bias")}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        what = (f"missing {', '.join(missing[:4])}" if missing else "") + ("; " if missing and unexpected else "") + \
               (f"unexpected {', '.join(unexpected[:4])}" if unexpected else "")
        raise ValueError(f"{flag} {path}: not VGGish's torchvggish key layout ({what}); expected {WEIGHTS_HELP}")
    channels = [int(state[f"features.{i}.weight"].shape[0]) for i in CONV_INDICES]
    hidden = int(state["embeddings.0.weight"].shape[0])
    size = int(state["embeddings.4.weight"].shape[0])
    shapes = {}
    cin = 1
    for i, c in zip(CONV_INDICES, channels):
        shapes[f"features.{i}.weight"], shapes[f"features.{i}.bias"] = (c, cin, 3, 3), (c,)
        cin = c
    for i, (o, n) in zip(FC_INDICES, [(hidden, cin * OUT_FRAMES * OUT_BANDS), (hidden, hidden), (size, hidden)]):
        shapes[f"embeddings.{i}.weight"], shapes[f"embeddings.{i}.bias"] = (o, n), (o,)
    for k, shape in shapes.items():
        if tuple(state[k].shape) != shape:
            raise ValueError(f"{flag} {path}: {k} has shape {tuple(state[k].shape)}, VGGish needs {shape}")
    return {"channels": channels, "hidden": hidden, "embedding_size": size}


def describe(net: VGGish) -> str:
    """How the summary names these features."""
    full = net.sizes == (FULL_CHANNELS, FULL_HIDDEN, EMBEDDING_SIZE)
    return ("VGGish embeddings (128-d, pre-activation, no PCA; 0.96 s examples at 16 kHz)" if full else
            f"VGGish-layout embeddings ({net.num_features}-d, reduced widths: not the released model)")
