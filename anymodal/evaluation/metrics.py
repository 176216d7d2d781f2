"""The metrics of the benchmark tasks, from the libraries that define them.

* FID and KID: torchmetrics' ``FrechetInceptionDistance`` / ``KernelInceptionDistance`` over the
  Inception-v3 features of torch-fidelity (the features of the original TF FID), or over any
  feature module (a CLIP image tower, or the tiny networks of the tests).
* FAD: the same Fréchet distance (torchmetrics' FID class) over VGGish embeddings of 0.96 s
  examples (Kilgour et al.; :mod:`.vggish`), or over CLAP audio embeddings when no VGGish weights
  are given.
* CLIPScore: torchmetrics' computation, max(mean of 100 * cos(image, text), 0); CLAP score is the
  same formula over CLAP's audio and text embeddings; CLIPSIM the mean over frames of cos(frame, text).
* CIDEr-D, BLEU-4, METEOR: pycocoevalcap's scorers on PTB-tokenised captions (Java's Stanford
  tokenizer where Java is present, a pure-Python approximation of it where not).
* VQA accuracy: the official formula and answer normalisation (GT-Vision-Lab/VQA), whose tables are
  kept as data in ``vqa_normalization.json``.

Feature networks are loaded only from local folders and files; nothing is downloaded.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

INCEPTION_WEIGHTS_HELP = ("torch-fidelity's Inception-v3 FID weights, pt_inception-2015-12-05-6726825d.pth, from "
                          "https://github.com/toshas/torch-fidelity/releases (weights-inception-2015-12-05-6726825d.pth)")
CLIP_HELP = ("a local CLIP folder (CLIPModel + CLIPProcessor, save_pretrained layout), e.g. a download of "
             "openai/clip-vit-large-patch14 from the Hugging Face hub")
CLAP_HELP = ("a local CLAP folder (ClapModel + ClapProcessor, save_pretrained layout), e.g. a download of "
             "laion/clap-htsat-unfused from the Hugging Face hub")


def _embeds(out: Any) -> torch.Tensor:
    """``get_*_features`` returns a tensor in transformers 4 and an output with ``pooler_output`` in 5."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _need_dir(path: str | Path | None, flag: str, help: str, task: str) -> Path:
    if path is None:
        raise ValueError(f"{task} needs {flag} DIR: {help}")
    path = Path(path)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise FileNotFoundError(f"{flag} {path}: not a model folder with a config.json; expected {help}")
    return path


# ==================================================================== CLIP and CLAP
class Clip:
    """A CLIP model and its processor, loaded from a local folder; batched, no-grad embeddings."""

    def __init__(self, model, processor, device: str | torch.device = "cpu", batch_size: int = 32):
        self.model, self.processor = model.eval().to(device), processor
        self.device, self.batch_size = torch.device(device), batch_size

    @classmethod
    def from_dir(cls, path: str | Path | None, task: str = "this task", device: str | None = None) -> "Clip":
        from transformers import CLIPModel, CLIPProcessor

        path = _need_dir(path, "--clip-model", CLIP_HELP, task)
        return cls(CLIPModel.from_pretrained(path), CLIPProcessor.from_pretrained(path), device or "cpu")

    @torch.no_grad()
    def image_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        out = []
        for i in range(0, len(images), self.batch_size):
            px = self.processor(images=[im.convert("RGB") for im in images[i:i + self.batch_size]], return_tensors="pt")
            out.append(_embeds(self.model.get_image_features(pixel_values=px["pixel_values"].to(self.device))).float())
        return torch.cat(out).cpu()

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        out = []
        limit = self.model.config.text_config.max_position_embeddings
        for i in range(0, len(texts), self.batch_size):
            tok = self.processor(text=list(texts[i:i + self.batch_size]), return_tensors="pt", padding=True)
            # as torchmetrics' CLIPScore: captions longer than the text tower's positions are cut
            ids, mask = tok["input_ids"][:, :limit], tok["attention_mask"][:, :limit]
            out.append(_embeds(self.model.get_text_features(input_ids=ids.to(self.device),
                                                            attention_mask=mask.to(self.device))).float())
        return torch.cat(out).cpu()


class Clap:
    """A CLAP model and its processor, loaded from a local folder; batched, no-grad embeddings."""

    def __init__(self, model, processor, device: str | torch.device = "cpu", batch_size: int = 16):
        self.model, self.processor = model.eval().to(device), processor
        self.device, self.batch_size = torch.device(device), batch_size
        self.sample_rate = int(processor.feature_extractor.sampling_rate)

    @classmethod
    def from_dir(cls, path: str | Path | None, task: str = "this task", device: str | None = None) -> "Clap":
        from transformers import ClapModel, ClapProcessor

        path = _need_dir(path, "--clap-model", CLAP_HELP, task)
        return cls(ClapModel.from_pretrained(path), ClapProcessor.from_pretrained(path), device or "cpu")

    @torch.no_grad()
    def audio_features(self, waves: Sequence[np.ndarray]) -> torch.Tensor:
        """Embeddings of mono float waveforms at :attr:`sample_rate`."""
        out = []
        for i in range(0, len(waves), self.batch_size):
            feats = self.processor(audio=[np.asarray(w, np.float32) for w in waves[i:i + self.batch_size]],
                                   sampling_rate=self.sample_rate, return_tensors="pt")
            feats = {k: v.to(self.device) for k, v in feats.items()}
            out.append(_embeds(self.model.get_audio_features(**feats)).float())
        return torch.cat(out).cpu()

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), self.batch_size):
            tok = self.processor(text=list(texts[i:i + self.batch_size]), return_tensors="pt", padding=True,
                                 truncation=True)
            tok = {k: v.to(self.device) for k, v in tok.items()}
            out.append(_embeds(self.model.get_text_features(**tok)).float())
        return torch.cat(out).cpu()


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a / a.norm(dim=-1, keepdim=True) * (b / b.norm(dim=-1, keepdim=True))).sum(-1)


def clip_scores(clip: Clip, images: Sequence[Image.Image], texts: Sequence[str]) -> np.ndarray:
    """Per-item ``100 * cos(E_image, E_text)``; :func:`clip_score` of them is torchmetrics' CLIPScore."""
    return (100 * cosine(clip.image_features(images), clip.text_features(texts))).double().numpy()


def clip_score(per_item: Sequence[float]) -> float:
    """torchmetrics' CLIPScore of per-item ``100 * cos`` values: ``max(mean, 0)`` (it clamps the
    mean, not each item; with real CLIP models the cosines are positive and the two agree)."""
    return max(float(np.mean(per_item)), 0.0)


def clipsim(clip: Clip, videos: Sequence[Sequence[Image.Image]], texts: Sequence[str]) -> np.ndarray:
    """Per-item CLIPSIM: the mean over a video's frames of cos(E_frame, E_text) (GODIVA, NUWA)."""
    text = clip.text_features(texts)
    return np.array([float(cosine(clip.image_features(list(frames)), text[i:i + 1]).mean())
                     for i, frames in enumerate(videos)])


# ==================================================================== Fréchet distances
class ClipImageFeatures(nn.Module):
    """A CLIP image tower as a torchmetrics feature module: uint8 ``(N, 3, H, W)`` in, embeddings out."""

    def __init__(self, clip: Clip):
        super().__init__()
        self.clip = clip
        self.num_features = int(clip.model.config.projection_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.image_features([Image.fromarray(x.permute(1, 2, 0).cpu().numpy()) for x in images])


class Embeddings(nn.Module):
    """Features computed beforehand (VGGish or CLAP audio embeddings for FAD), as a torchmetrics feature module."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def inception_features(weights: str | Path | None, task: str = "t2i") -> nn.Module:
    """torch-fidelity's Inception-v3 (2048-d pool features), from a local weights file only.

    torch-fidelity reads the file with pickle enabled; it is opened here first with
    ``torch.load(weights_only=True)``, which refuses anything but tensors, so a file that would run
    code never reaches it."""
    if weights is None:
        raise ValueError(f"{task} needs --fid-weights FILE: {INCEPTION_WEIGHTS_HELP}; or --fid-features clip "
                         "(FID over the --clip-model's image embeddings, not comparable with papers)")
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"--fid-weights {path}: no such file; expected {INCEPTION_WEIGHTS_HELP}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"--fid-weights {path}: not a plain PyTorch state dict ({type(e).__name__}); expected "
                         f"{INCEPTION_WEIGHTS_HELP}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"--fid-weights {path}: not a state dict of tensors; expected {INCEPTION_WEIGHTS_HELP}")
    from torchmetrics.image.fid import NoTrainInceptionV3

    net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(path))
    net.num_features = 2048
    return net


def images_to_uint8(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """RGB images resized (bicubic) to ``size`` x ``size``, as a uint8 ``(N, 3, size, size)`` tensor."""
    arrs = [np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC)) for im in images]
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()


def frechet_distance(feature: nn.Module, real: torch.Tensor, fake: torch.Tensor, batch_size: int = 32) -> float:
    """torchmetrics' Fréchet distance between the ``feature`` statistics of ``real`` and ``fake``
    (FID for images with the Inception network, FAD for audio with an audio embedding)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"a Fréchet distance needs at least 2 real and 2 generated items, got {len(real)} and {len(fake)}")
    metric = FrechetInceptionDistance(feature=feature, normalize=real.dtype != torch.uint8)
    with torch.no_grad():
        for i in range(0, len(real), batch_size):
            metric.update(real[i:i + batch_size], real=True)
        for i in range(0, len(fake), batch_size):
            metric.update(fake[i:i + batch_size], real=False)
        return float(metric.compute())


def kernel_distance(feature: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> tuple[float, float]:
    """torchmetrics' KID (mean, std over subsets of at most 1000 items)."""
    from torchmetrics.image.kid import KernelInceptionDistance

    n = min(len(real), len(fake), 1000)
    if n < 2:
        raise ValueError(f"KID needs at least 2 real and 2 generated items, got {len(real)} and {len(fake)}")
    metric = KernelInceptionDistance(feature=feature, subset_size=n, subsets=100 if n < len(real) else 1)
    with torch.no_grad():
        metric.update(real, real=True)
        metric.update(fake, real=False)
        mean, std = metric.compute()
    return float(mean), float(std)


# ==================================================================== captions
def java_available() -> bool:
    return shutil.which("java") is not None


# Stanford PTBTokenizer, approximated: "don't" -> "do n't", "dog's" -> "dog 's", hyphenated words and
# decimals kept whole, any other punctuation one token (and then dropped, as pycocoevalcap does).
_PTB_APPROX = re.compile(r"\w+(?=n't\b)|n't\b|'(?:s|re|ve|ll|d|m)\b|\w+(?:[-.]\w+)*|\.\.\.|--|\S")


def tokenize(captions: dict[str, list[str]], java: bool) -> dict[str, list[str]]:
    """pycocoevalcap's tokenisation: Stanford's PTBTokenizer (lower-cased, punctuation dropped)
    when ``java``, else a pure-Python approximation of it."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS, PTBTokenizer

    if java:
        return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})
    drop = set(PUNCTUATIONS)
    return {k: [" ".join(t for t in _PTB_APPROX.findall(c.replace("\n", " ").lower()) if t not in drop) for c in v]
            for k, v in captions.items()}


def caption_metrics(refs: dict[str, list[str]], hyps: dict[str, str], meteor: bool) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """pycocoevalcap's CIDEr-D, BLEU-1..4 and (when ``meteor``) METEOR on already tokenised captions:
    the corpus scores (x100, as papers print them) and the per-item ones."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    keys = list(refs)
    gts = {k: refs[k] for k in keys}
    res = {k: [hyps[k]] for k in keys}
    corpus: dict[str, float] = {}
    per_item: dict[str, dict[str, float]] = {k: {} for k in keys}
    cider, cider_items = Cider().compute_score(gts, res)
    corpus["CIDEr"] = 100 * float(cider)
    bleu, bleu_items = Bleu(4).compute_score(gts, res, verbose=0)
    for n in (1, 4):
        corpus[f"BLEU-{n}"] = 100 * float(bleu[n - 1])
    for i, k in enumerate(keys):
        per_item[k]["CIDEr"] = 100 * float(cider_items[i])
        per_item[k]["BLEU-4"] = 100 * float(bleu_items[3][i])
    if meteor:
        from pycocoevalcap.meteor.meteor import Meteor

        m = Meteor()  # a Java process, ended when the scorer is collected
        score, items = m.compute_score(gts, res)
        del m
        corpus["METEOR"] = 100 * float(score)
        for i, k in enumerate(keys):
            per_item[k]["METEOR"] = 100 * float(items[i])
    return corpus, per_item


# ==================================================================== VQA
@lru_cache(maxsize=1)
def _vqa_tables() -> dict[str, Any]:
    return json.loads((Path(__file__).with_name("vqa_normalization.json")).read_text(encoding="utf-8"))


@dataclass(frozen=True)
class VQANormalizer:
    """The official VQA answer normalisation (punctuation, then digits, articles and contractions)."""

    contractions: dict[str, str]
    number_words: dict[str, str]
    articles: frozenset[str]
    punctuation: tuple[str, ...]
    period_strip: re.Pattern
    comma_strip: re.Pattern
    period_strip_count: int

    @classmethod
    def official(cls) -> "VQANormalizer":
        t = _vqa_tables()
        return cls(t["contractions"], t["number_words"], frozenset(t["articles"]), tuple(t["punctuation"]),
                   re.compile(t["period_strip"]), re.compile(t["comma_strip"]), int(t["period_strip_count"]))

    def punctuation_step(self, text: str) -> str:
        out = text
        for p in self.punctuation:
            if (p + " " in text or " " + p in text) or self.comma_strip.search(text) is not None:
                out = out.replace(p, "")
            else:
                out = out.replace(p, " ")
        return self.period_strip.sub("", out, count=self.period_strip_count)

    def digit_article_step(self, text: str) -> str:
        words = [self.number_words.get(w, w) for w in text.lower().split()]
        words = [self.contractions.get(w, w) for w in words if w not in self.articles]
        return " ".join(words)

    def __call__(self, text: str) -> str:
        return self.digit_article_step(self.punctuation_step(text))


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_accuracy(prediction: str, answers: Sequence[str], normalizer: VQANormalizer | None = None) -> float:
    """The official VQA accuracy of one answer: the mean, over the ten leave-one-annotator-out
    subsets of the human answers, of ``min(#matches / 3, 1)``. Answers are normalised only when the
    annotators disagree, exactly as the official evaluation does."""
    if not answers:
        raise ValueError("a VQA question needs its human answers")
    norm = normalizer or VQANormalizer.official()
    gts = [_clean(a) for a in answers]
    pred = _clean(prediction)
    if len(set(gts)) > 1:
        gts = [norm(a) for a in gts]
        pred = norm(pred)
    accs = [min(1.0, sum(1 for j, a in enumerate(gts) if j != i and a == pred) / 3) for i in range(len(gts))]
    return sum(accs) / len(accs)


# ==================================================================== intervals
def bootstrap_ci(values: Sequence[float], resamples: int = 1000, seed: int = 0, level: float = 0.95) -> list[float] | None:
    """A percentile bootstrap interval of the mean (``None`` for fewer than 2 values)."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2 or resamples < 1:
        return None
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(resamples, len(x)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]
