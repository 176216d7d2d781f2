"""The benchmark tasks as data, and the run: read the split, generate through the batch runner, score.

A task is one row of :data:`TASKS`: which reader, which medium, the prompt template, and which
kind of scoring. Generation goes through :func:`anymodal.batch.run_batch` (batched, resumable
after a kill with nothing generated twice, sharded under ``accelerate launch``); scoring reads the
recorded outputs back, so a re-run only scores.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from ..modality import Modality
from .metrics import (Clap, Clip, ClipImageFeatures, Embeddings, VQANormalizer, bootstrap_ci, caption_metrics, clip_score,
                      clip_scores, clipsim, cosine, frechet_distance, images_to_uint8, inception_features,
                      java_available, kernel_distance, tokenize, vqa_accuracy)
from .data import READERS, Dataset, Item
from .vggish import VGGish, describe as describe_vggish

GENERATION_DIR = "generation"


@dataclass(frozen=True)
class Task:
    name: str
    dataset: str  # a key of data.READERS
    kind: str  # "generate" (text to medium), "caption" (medium to text) or "vqa"
    modality: Modality  # the medium generated, or given
    prompt: str  # the template: {caption} or {question}; <image>/<audio>/<video> mark the given medium
    metrics: tuple[str, ...]
    split: str | None = None  # the default split (a part of the annotation file's name, or MSR-VTT's split)


TASKS: dict[str, Task] = {t.name: t for t in [
    Task("t2i", "coco", "generate", Modality.IMAGE, "Generate an image of {caption}", ("FID", "KID", "CLIPScore")),
    Task("t2a", "audiocaps", "generate", Modality.AUDIO, "Generate the sound of {caption}", ("FAD", "CLAP score")),
    Task("t2v", "msrvtt", "generate", Modality.VIDEO, "Generate a video of {caption}", ("CLIPSIM",), split="test"),
    Task("i2t", "coco", "caption", Modality.IMAGE, "<image>\nDescribe this image in one sentence.",
         ("CIDEr", "BLEU-4", "METEOR")),
    Task("a2t", "audiocaps", "caption", Modality.AUDIO, "<audio>\nDescribe this sound in one sentence.",
         ("CIDEr", "BLEU-4", "METEOR")),
    Task("v2t", "msrvtt", "caption", Modality.VIDEO, "<video>\nDescribe this video in one sentence.",
         ("CIDEr", "BLEU-4", "METEOR"), split="test"),
    Task("vqa", "vqav2", "vqa", Modality.IMAGE,
         "<image>\n{question}\nAnswer the question using a single word or phrase.", ("VQA accuracy",)),
]}


@dataclass
class FeatureOptions:
    """Where the feature networks come from (local files and folders only)."""

    fid_weights: str | None = None
    fid_features: str = "inception"  # or "clip": FID over the CLIP image embeddings
    clip_model: str | None = None
    clap_model: str | None = None
    fad_model: str | None = None  # "vggish" or "clap"; None: vggish when vggish_weights is given, else clap
    vggish_weights: str | None = None
    meteor: str = "auto"  # "auto": where Java is present; "on"; "off"
    device: str | None = None
    image_size: int = 299  # images are resized to this before the FID feature network
    video_frames: int = 8  # frames per video read for CLIPSIM


@dataclass
class Features:
    """The networks a task's metrics need, loaded before anything is generated."""

    clip: Clip | None = None
    clap: Clap | None = None
    vggish: VGGish | None = None  # FAD's features when set; else FAD is over CLAP's audio embeddings
    fid: Any = None  # a torchmetrics feature module
    fid_name: str = ""  # the features of the Fréchet distance (FID, or FAD), named in the summary
    meteor: bool = False
    java: bool = False
    image_size: int = 299
    video_frames: int = 8
    device: str = "cpu"

    @classmethod
    def load(cls, task: Task, opts: FeatureOptions) -> "Features":
        f = cls(image_size=opts.image_size, video_frames=opts.video_frames, device=opts.device or "cpu")
        if task.name == "t2i":
            f.clip = Clip.from_dir(opts.clip_model, "t2i (CLIPScore)", opts.device)
            if opts.fid_features == "clip":
                f.fid, f.fid_name = ClipImageFeatures(f.clip), "CLIP image embeddings (not comparable with papers)"
            elif opts.fid_features == "inception":
                f.fid = inception_features(opts.fid_weights).to(f.device)
                f.fid_name = "Inception-v3 pool3 (torch-fidelity)"
            else:
                raise ValueError(f"--fid-features must be inception or clip, got {opts.fid_features!r}")
        elif task.name == "t2a":
            fad = opts.fad_model or ("vggish" if opts.vggish_weights is not None else "clap")
            if fad == "vggish":
                f.vggish = VGGish.from_file(opts.vggish_weights).to(f.device)
                f.fid_name = describe_vggish(f.vggish)
                if opts.clap_model is not None:  # CLAP score is optional next to FAD over VGGish
                    f.clap = Clap.from_dir(opts.clap_model, "t2a (CLAP score)", opts.device)
            elif fad == "clap":
                if opts.vggish_weights is not None:
                    raise ValueError("--vggish-weights is for --fad-model vggish; with --fad-model clap, FAD is over "
                                     "the --clap-model's audio embeddings: drop one of the two")
                f.clap = Clap.from_dir(opts.clap_model, "t2a (CLAP score, and FAD unless --vggish-weights FILE is "
                                                        "given)", opts.device)
                f.fid_name = "CLAP audio embeddings (not comparable with papers' FAD, which is over VGGish)"
            else:
                raise ValueError(f"--fad-model must be vggish or clap, got {fad!r}")
        elif task.name == "t2v":
            f.clip = Clip.from_dir(opts.clip_model, "t2v (CLIPSIM)", opts.device)
        if task.kind == "caption":
            f.java = java_available()
            if opts.meteor not in ("auto", "on", "off"):
                raise ValueError(f"--meteor must be auto, on or off, got {opts.meteor!r}")
            if opts.meteor == "on" and not f.java:
                raise ValueError("--meteor on needs Java (the METEOR 1.5 jar runs in it); install a JRE or use --meteor off")
            f.meteor = f.java and opts.meteor != "off"
        return f


# ==================================================================== generation
def _prompt(task: Task, template: str, item: Item) -> str:
    if task.kind == "generate":
        return template.format(caption=item.captions[0])
    if task.kind == "vqa":
        return template.format(question=item.question)
    return template


_FIELDS = {"generate": {"caption"}, "vqa": {"question"}, "caption": set()}


def check_template(task: Task, template: str) -> None:
    """The fields a prompt template may use: ``{caption}`` (t2x, required), ``{question}`` (vqa, required)."""
    import string

    try:
        used = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise ValueError(f"--prompt {template!r}: not a valid template ({e}); write a literal brace as {{{{ or }}}}") from None
    allowed = _FIELDS[task.kind]
    if used - allowed or (allowed and not allowed <= used):
        need = f"must contain {{{next(iter(allowed))}}} and no other field" if allowed else "takes no {fields}"
        raise ValueError(f"--prompt {template!r}: a {task.name} prompt {need}")


def rows_for(task: Task, items: Iterable[Item], template: str | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """The batch rows of ``items``: one per item, the medium given for captioning and VQA."""
    template = template or task.prompt
    check_template(task, template)
    rows = []
    for it in items:
        row: dict[str, Any] = {"id": it.id, "prompt": _prompt(task, template, it), "seed": seed}
        if task.kind != "generate":
            row[task.modality.spec.plural] = [str(it.media)]
        rows.append(row)
    return rows


def select(task: Task, data: str | Path, split: str | None = None, limit: int | None = None) -> tuple[Dataset, list[Item]]:
    """The split's items in their fixed order, the first ``limit`` of them."""
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be a positive integer, got {limit}")
    ds = READERS[task.dataset](data, split if split is not None else task.split)
    if not ds.items:
        raise ValueError(f"{ds.name} under {data}: no item has its media file ({ds.missing_media} listed items "
                         "had none); see docs/evaluation.md for the folder layout")
    return ds, ds.items[:limit] if limit else ds.items


def check_model(task: Task, pipe) -> None:
    """Refuse a model that cannot do ``task`` before generating anything for it."""
    m = task.modality
    if task.kind == "generate":
        if m not in pipe.generators:
            made = ", ".join(x.value for x in pipe.generators) or "text only"
            raise ValueError(f"{task.name} needs a model that generates {m.value}; this one has no {m.value} "
                             f"generator (it makes {made})")
    else:
        try:
            pipe.processor.check_takes(m)
        except ValueError as e:
            raise ValueError(f"{task.name}: {e}") from None


def generate(task: Task, pipe, items: list[Item], out: str | Path, *, template: str | None = None, seed: int = 0,
             batch_size: int = 8, max_new_tokens: int | None = None, progress: bool | None = None,
             process_index: int = 0, num_processes: int = 1) -> dict[str, int]:
    """Generate every item not yet recorded under ``out/generation`` (this process's shard); return
    how many were generated, failed, and skipped as recorded by an earlier run."""
    from ..batch import run_batch

    check_model(task, pipe)
    rows = rows_for(task, items, template, seed)
    counts = {"generated": 0, "errors": 0, "skipped": 0}
    for r in run_batch(pipe, rows, Path(out) / GENERATION_DIR, batch_size, seed=seed, process_index=process_index,
                       num_processes=num_processes, max_new_tokens=max_new_tokens, video_format="mp4",
                       progress=progress):
        counts["skipped" if r.skipped else "generated" if r.status == "done" else "errors"] += 1
    return counts


# ==================================================================== scoring
def _reply_text(text: str | None) -> str:
    """The reply as a caption or an answer: media placeholders (``<image>``, any registered
    modality's) dropped, first non-empty line."""
    from ..modality import media_modalities

    placeholder = re.compile("<(?:" + "|".join(re.escape(m.value) for m in media_modalities()) + ")>")
    lines = [ln.strip() for ln in placeholder.sub(" ", text or "").splitlines() if ln.strip()]
    return re.sub(r"\s+", " ", lines[0]) if lines else ""


def _records(out: Path) -> dict[str, dict[str, Any]]:
    path = out / GENERATION_DIR / "results.jsonl"
    recs = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                r = json.loads(line)
                recs[r["key"]] = r
    return recs


def _load_native(path: Path) -> tuple[np.ndarray, int]:
    """A mono waveform at its own sample rate."""
    from ..encoders.preprocess import load_audio

    wave, sr = load_audio(str(path))
    return wave.numpy(), sr


def _load_audio(path: Path, rate: int) -> np.ndarray:
    """A mono waveform resampled to ``rate``."""
    import torch

    from ..encoders.preprocess import resample

    wave, sr = _load_native(path)
    return resample(torch.from_numpy(wave), sr, rate).numpy()


def _chunks(items: list, progress: bool | None, desc: str, size: int = 32):
    """``items`` in chunks, with a progress bar (ETA) over the items."""
    import sys

    from tqdm.auto import tqdm

    show = sys.stderr.isatty() if progress is None else progress
    with tqdm(total=len(items), desc=desc, unit="item", disable=not show, dynamic_ncols=True) as bar:
        for i in range(0, len(items), size):
            yield items[i:i + size]
            bar.update(len(items[i:i + size]))


def score(task: Task, items: list[Item], out: str | Path, features: Features, *, template: str | None = None,
          seed: int = 0, bootstrap: int = 1000, progress: bool | None = None) -> tuple[list[dict[str, Any]], dict[str, Any], list[str]]:
    """Per-item records, corpus metrics (``{name: {"value", "ci95", "n"}}``) and notes."""
    out = Path(out)
    recs = _records(out)
    template = template or task.prompt
    per: list[dict[str, Any]] = []
    notes: list[str] = []
    usable: list[tuple[Item, dict[str, Any], Any]] = []  # (item, per-item record, the output)
    for it in items:
        rec = recs.get(it.id)
        row = {"id": it.id, "prompt": _prompt(task, template, it)}
        if rec is None or rec["status"] != "done":
            row["error"] = (rec or {}).get("error") or "not generated"
            per.append(row)
            continue
        row["text"] = rec.get("text")
        if task.kind == "generate":
            files = rec.get("files", {}).get(task.modality.value, [])
            if not files:
                row["error"] = f"the reply has no {task.modality.value}"
                per.append(row)
                continue
            row["output"] = files[0]
            usable.append((it, row, out / GENERATION_DIR / files[0]))
        else:
            usable.append((it, row, _reply_text(rec.get("text"))))
        per.append(row)
    missing = len(items) - len(usable)
    if missing:
        notes.append(f"{missing} of {len(items)} items have no usable output (see the 'error' of each in scores.jsonl); "
                     "they are left out of every metric")
    result: dict[str, Any] = {}

    def mean_metric(name: str, values: list[float], clamp: bool = False) -> None:
        if values:
            ci = bootstrap_ci(values, bootstrap, seed)
            value = clip_score(values) if clamp else float(np.mean(values))
            if clamp and ci is not None:
                ci = [max(ci[0], 0.0), max(ci[1], 0.0)]
            result[name] = {"value": value, "ci95": ci, "n": len(values)}

    if task.kind == "vqa":
        norm = VQANormalizer.official()
        by_type: dict[str, list[float]] = {}
        for it, row, answer in usable:
            row["answer"] = answer
            row["accuracy"] = 100 * vqa_accuracy(answer, it.answers, norm)
            by_type.setdefault(str(it.extra.get("answer_type")), []).append(row["accuracy"])
        mean_metric("VQA accuracy", [r["accuracy"] for _, r, _ in usable])
        for kind, vals in sorted(by_type.items()):
            mean_metric(f"VQA accuracy ({kind})", vals)
    elif task.kind == "caption":
        java, why = features.java, "Java not found"
        if java:
            try:  # pycocoevalcap's PTBTokenizer writes a temporary file beside its jar, in site-packages
                tokenize({"probe": ["a probe."]}, True)
            except OSError as e:
                java, why = False, f"Stanford's PTBTokenizer could not run ({e})"
        refs = tokenize({it.id: it.captions for it, _, _ in usable}, java)
        hyps = {k: v[0] for k, v in tokenize({it.id: [c] for it, _, c in usable}, java).items()}
        notes.append("captions tokenised with Stanford's PTBTokenizer (Java)" if java else
                     f"{why}: captions tokenised with anymodal's pure-Python approximation of the PTB "
                     "tokenizer; scores can differ slightly from the Java-tokenised ones papers report")
        if not features.meteor:
            notes.append("METEOR skipped: " + ("--meteor off" if features.java else "it needs Java"))
        notes.append("SPICE skipped: it needs Java and Stanford CoreNLP models downloaded at run time")
        if usable:
            corpus, items_scores = caption_metrics(refs, hyps, features.meteor)
            for it, row, caption in usable:
                row["caption"] = caption
                row.update(items_scores[it.id])
            for name, value in corpus.items():
                # CIDEr (and METEOR) are means of per-item scores; BLEU is a corpus statistic, no mean to resample
                ci = (bootstrap_ci([r[name] for _, r, _ in usable], bootstrap, seed)
                      if name in ("CIDEr", "METEOR") else None)
                result[name] = {"value": value, "ci95": ci, "n": len(usable)}
    elif task.name == "t2i":
        real, fake = [], []
        for chunk in _chunks(usable, progress, "scoring t2i"):  # a chunk at a time: 30k images do not fit in memory
            chunk, pairs = _loaded(chunk, lambda it, p: (_rgb(p), _rgb(it.media)))
            if not chunk:
                continue
            gen, refs = [g for g, _ in pairs], [r for _, r in pairs]
            for (_, row, _), s in zip(chunk, clip_scores(features.clip, gen, [it.captions[0] for it, _, _ in chunk])):
                row["CLIPScore"] = float(s)
            with torch.no_grad():
                for imgs, into in ((refs, real), (gen, fake)):
                    into.append(features.fid(images_to_uint8(imgs, features.image_size).to(features.device)).double().cpu())
        mean_metric("CLIPScore", _values(usable, "CLIPScore"), clamp=True)
        if real:
            real_f, fake_f = torch.cat(real), torch.cat(fake)
            try:  # torchmetrics' FID and KID over the features computed once above
                result["FID"] = {"value": frechet_distance(Embeddings(real_f.shape[1]), real_f, fake_f), "ci95": None,
                                 "n": len(real_f), "features": features.fid_name}
                kid, kid_std = kernel_distance(Embeddings(real_f.shape[1]), real_f, fake_f)
                result["KID"] = {"value": kid, "std": kid_std, "ci95": None, "n": len(real_f),
                                 "features": features.fid_name}
            except ValueError as e:
                notes.append(f"FID and KID not computed: {e}")
    elif task.name == "t2a":
        clap, vgg = features.clap, features.vggish
        # CLAP's processor crops longer clips at a random offset: crop them here, the same way every run
        length = int(clap.sample_rate * getattr(clap.processor.feature_extractor, "max_length_s", 10)) if clap else 0

        def load(it, p):
            out = {}
            if vgg is not None:  # whole clips at their own rate: VGGish's front end resamples
                out["vggish"] = (_load_native(p), _load_native(it.media))
            if clap is not None:  # the reference clip too only where FAD is over CLAP
                out["clap"] = (_load_audio(p, clap.sample_rate)[:length],
                               None if vgg is not None else _load_audio(it.media, clap.sample_rate)[:length])
            return out

        real, fake = [], []
        no_example = {"generated": 0, "reference": 0}
        for chunk in _chunks(usable, progress, "scoring t2a"):
            chunk, loaded = _loaded(chunk, load)
            if not chunk:
                continue
            if vgg is not None:  # FAD over every 0.96 s example's embedding, as the FAD reference
                gen = vgg.embed([x["vggish"][0] for x in loaded])
                ref = vgg.embed([x["vggish"][1] for x in loaded])
                no_example["generated"] += sum(1 for e in gen if len(e) == 0)
                no_example["reference"] += sum(1 for e in ref if len(e) == 0)
                fake += gen
                real += ref
            if clap is not None:
                gen_c = clap.audio_features([x["clap"][0] for x in loaded])
                if vgg is None:
                    real.append(clap.audio_features([x["clap"][1] for x in loaded]))
                    fake.append(gen_c)
                text = clap.text_features([it.captions[0] for it, _, _ in chunk])
                for (_, row, _), s in zip(chunk, (100 * cosine(gen_c, text)).tolist()):
                    row["CLAP score"] = float(s)
        if clap is not None:
            mean_metric("CLAP score", _values(usable, "CLAP score"), clamp=True)
        else:
            notes.append("CLAP score skipped: no --clap-model given")
        if any(no_example.values()):
            notes.append(f"{no_example['generated']} generated and {no_example['reference']} reference clips are "
                         "shorter than 0.975 s: they have no VGGish example and add nothing to FAD")
        if real:
            real_f, fake_f = torch.cat(real).double(), torch.cat(fake).double()
            n_clips = sum(1 for _, row, _ in usable if "error" not in row)
            try:
                result["FAD"] = {"value": frechet_distance(Embeddings(real_f.shape[1]), real_f, fake_f), "ci95": None,
                                 "n": n_clips, "features": features.fid_name,
                                 "embeddings": {"reference": len(real_f), "generated": len(fake_f)}}
            except ValueError as e:
                notes.append(f"FAD not computed: {e}")
    elif task.name == "t2v":
        from ..encoders.preprocess import load_video_frames

        for chunk in _chunks(usable, progress, "scoring t2v"):
            chunk, frames = _loaded(chunk, lambda it, p: load_video_frames(str(p), features.video_frames))
            if not chunk:
                continue
            for (_, row, _), s in zip(chunk, clipsim(features.clip, frames, [it.captions[0] for it, _, _ in chunk])):
                row["CLIPSIM"] = float(s)
        mean_metric("CLIPSIM", _values(usable, "CLIPSIM"))
        notes.append("FVD not computed (optional in the issue; not implemented)")
    unreadable = sum(1 for _, row, _ in usable if "error" in row)
    if unreadable:
        notes.append(f"{unreadable} items have a medium that could not be read (see scores.jsonl); they are left out")
    return per, result, notes


def _rgb(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def _loaded(chunk: list, load) -> tuple[list, list]:
    """The items of ``chunk`` whose media ``load(item, output)`` reads, and what it read; an item whose
    medium cannot be read gets the reason as its error and is left out."""
    from ..media import MediaError

    kept, values = [], []
    for entry in chunk:
        it, row, output = entry
        try:
            values.append(load(it, output))
        except (OSError, ValueError, MediaError) as e:
            row["error"] = f"cannot read a medium: {e}"
            continue
        kept.append(entry)
    return kept, values


def _values(usable: list, name: str) -> list[float]:
    return [row[name] for _, row, _ in usable if name in row]


# ==================================================================== reports
def write_reports(out: Path, summary: dict[str, Any], per_item: list[dict[str, Any]]) -> None:
    from ..utils import atomic_write_text

    atomic_write_text(out / "scores.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in per_item))
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(out / "summary.md", markdown(summary))


def _fmt(x: float) -> str:
    return f"{x:.4f}" if abs(x) < 10 else f"{x:.2f}"


def markdown(summary: dict[str, Any]) -> str:
    lines = [f"# anymodal eval: {summary['task']} on {summary['dataset']}", "",
             f"- model: `{summary['model']}`",
             f"- data: `{summary['data']}` (split {summary['split'] or 'default'}), SHA-256 `{summary['data_checksum']}`",
             f"- n = {summary['n']} of {summary['n_available']} items in the data; seed {summary['seed']}; "
             f"prompt `{summary['prompt']!r}`", "",
             "| task | model | metric | value | 95% CI | n |", "|---|---|---|---|---|---|"]
    for name, m in summary["metrics"].items():
        ci = f"[{_fmt(m['ci95'][0])}, {_fmt(m['ci95'][1])}]" if m.get("ci95") else "—"
        lines.append(f"| {summary['task']} | {summary['model']} | {name} | {_fmt(m['value'])} | {ci} | {m['n']} |")
    named = [f"- {name} over {m['features']}" for name, m in summary["metrics"].items() if m.get("features")]
    if named:
        lines += ["", *named]
    if summary["notes"]:
        lines += ["", "Notes:", *(f"- {n}" for n in summary["notes"])]
    return "\n".join(lines) + "\n"


@dataclass
class EvalRun:
    """One ``anymodal eval`` run on a benchmark task (see :func:`run_eval`)."""

    task: Task
    data: Path
    out: Path
    split: str | None = None
    limit: int | None = None
    seed: int = 0
    prompt: str | None = None
    model: str = ""
    bootstrap: int = 1000
    options: FeatureOptions = field(default_factory=FeatureOptions)

    def summarise(self, ds: Dataset, items: list[Item], features: Features,
                  progress: bool | None = None) -> dict[str, Any]:
        per, result, notes = score(self.task, items, self.out, features, template=self.prompt, seed=self.seed,
                                   bootstrap=self.bootstrap, progress=progress)
        full = len(ds.items)
        if len(items) < full or ds.missing_media:
            notes.insert(0, f"n = {len(items)} is below the full split ({full + ds.missing_media} items listed"
                            + (f", {ds.missing_media} of them without a media file here" if ds.missing_media else "")
                            + "): not comparable with papers' numbers on the full split")
        summary = {
            "task": self.task.name, "dataset": ds.name, "data": str(self.data), "split": self.split or self.task.split,
            "model": self.model, "data_checksum": ds.checksum(items), "seed": self.seed, "n": len(items),
            "n_available": full, "missing_media": ds.missing_media, "limit": self.limit,
            "prompt": self.prompt or self.task.prompt, "metrics": result, "notes": notes,
            "bootstrap_resamples": self.bootstrap, "options": asdict(self.options),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_reports(self.out, summary, per)
        return summary


def run_eval(task: str | Task, pipe, data: str | Path, out: str | Path, *, split: str | None = None,
             limit: int | None = None, seed: int = 0, batch_size: int = 8, prompt: str | None = None,
             options: FeatureOptions | None = None, features: Features | None = None, model: str = "",
             bootstrap: int = 1000, max_new_tokens: int | None = None, progress: bool | None = None) -> dict[str, Any]:
    """Evaluate ``pipe`` on one benchmark task in one process; return the summary written to
    ``out/summary.json`` (with ``out/summary.md``, ``out/scores.jsonl`` and the generated outputs
    under ``out/generation``). A re-run on the same ``out`` generates only what is not recorded yet.

    ``features`` overrides the networks that ``options`` would load (tests pass tiny ones)."""
    task = _task(task)
    options = options or FeatureOptions()
    run = EvalRun(task, Path(data), Path(out), split, limit, seed, prompt, model, bootstrap, options)
    ds, items = select(task, data, split, limit)
    features = features or Features.load(task, options)  # before generating: a missing network fails fast
    generate(task, pipe, items, out, template=prompt, seed=seed, batch_size=batch_size, max_new_tokens=max_new_tokens,
             progress=progress)
    return run.summarise(ds, items, features, progress)


def _task(task: str | Task) -> Task:
    if isinstance(task, Task):
        return task
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)} (or toyworld)")
    return TASKS[task]
