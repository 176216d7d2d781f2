"""Readers of the benchmarks' released file layouts: one function per format, each returning
:class:`Item` s in a fixed order.

The order is the SHA-256 of each item's id, not the file's order: ``--limit N`` then takes a
sample spread over the whole split (COCO's and VQAv2's files list questions image by image), it is
the same for every model and every run, and adding items to a split does not reorder the others.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


@dataclass
class Item:
    """One benchmark item: the medium (input for captioning and VQA, reference for generation), the
    reference captions, and for VQA the question and its ten answers."""

    id: str
    media: Path | None
    captions: list[str] = field(default_factory=list)
    question: str | None = None
    answers: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # question/answer type, the source ids


@dataclass
class Dataset:
    """The items of one split, and the files they were read from (for the checksum)."""

    name: str
    items: list[Item]
    annotation_files: list[Path]
    missing_media: int = 0  # items listed in the annotations whose media file is not in the folder

    def checksum(self, items: list[Item] | None = None) -> str:
        """SHA-256 over the annotation files and the media files of ``items`` (default: all),
        with their names, so that a result says exactly which data it was computed on."""
        h = hashlib.sha256()
        for path in self.annotation_files:
            h.update(path.name.encode() + b"\0")
            _hash_file(h, path)
        for item in self.items if items is None else items:
            if item.media is not None:
                h.update(item.id.encode() + b"\0" + item.media.name.encode() + b"\0")
                _hash_file(h, item.media)
        return h.hexdigest()


def _hash_file(h, path: Path) -> None:
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def fixed_order(items: list[Item]) -> list[Item]:
    return sorted(items, key=lambda it: (hashlib.sha256(it.id.encode()).hexdigest(), it.id))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None


def _one_file(data: Path, patterns: list[str], what: str, split: str | None) -> Path:
    """The one annotation file matching ``patterns`` (recursively), narrowed by ``split`` when several match."""
    found = sorted({p for pat in patterns for p in data.rglob(pat) if p.is_file()})
    if split is not None and len(found) > 1:
        found = [p for p in found if split in p.name] or found
    if not found:
        raise FileNotFoundError(f"no {what} under {data} (looked for {' or '.join(patterns)})")
    if len(found) > 1:
        raise ValueError(f"several {what} files under {data}: {', '.join(str(p.relative_to(data)) for p in found)}; "
                         "choose one with --data-split (a part of its name, e.g. val2014)")
    return found[0]


def _index_files(data: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """Every file under ``data`` with one of ``suffixes``, by name (the first in sorted order wins)."""
    index: dict[str, Path] = {}
    for p in sorted(data.rglob("*")):
        if p.suffix.lower() in suffixes and p.is_file():
            index.setdefault(p.name, p)
    return index


def _need_dir(data: str | Path) -> Path:
    data = Path(data)
    if not data.is_dir():
        raise FileNotFoundError(f"--data: no such folder: {data}")
    return data


def _released_format(name: str):
    """A reader whose annotation entries lack a field, or hold the wrong type, raises one ValueError
    naming the benchmark and the field, not a KeyError from deep inside."""
    def wrap(reader):
        @functools.wraps(reader)
        def read(data, split=None):
            try:
                return reader(data, split)
            except KeyError as e:
                raise ValueError(f"{data}: the {name} annotations are not in the released format: an entry has no "
                                 f"{e.args[0]!r} field") from None
            except (TypeError, AttributeError) as e:
                raise ValueError(f"{data}: the {name} annotations are not in the released format ({e})") from None
        return read
    return wrap


# ---------------------------------------------------------------- COCO captions
@_released_format("COCO captions")
def read_coco_captions(data: str | Path, split: str | None = None) -> Dataset:
    """COCO captions as released: ``annotations/captions_<split>.json`` (``images`` with ``id`` and
    ``file_name``; ``annotations`` with ``image_id`` and ``caption``) and the images, anywhere under
    ``data`` (``val2014/COCO_val2014_000000000042.jpg``). One item per image with its captions."""
    data = _need_dir(data)
    ann_path = _one_file(data, ["captions_*.json"], "COCO captions file (captions_<split>.json)", split)
    ann = _read_json(ann_path)
    if not isinstance(ann, dict) or not isinstance(ann.get("images"), list) or not isinstance(ann.get("annotations"), list):
        raise ValueError(f"{ann_path}: not a COCO captions file (expected 'images' and 'annotations' lists)")
    caps: dict[Any, list[tuple[Any, str]]] = {}
    for a in ann["annotations"]:
        caps.setdefault(a["image_id"], []).append((a.get("id", 0), str(a["caption"]).strip()))
    files = _index_files(data, (".jpg", ".jpeg", ".png"))
    items, missing = [], 0
    for img in ann["images"]:
        path = files.get(img["file_name"])
        if path is None:
            missing += 1
            continue
        captions = [c for _, c in sorted(caps.get(img["id"], []))]
        if captions:
            items.append(Item(str(img["id"]), path, captions, extra={"file_name": img["file_name"]}))
    return Dataset("COCO captions", fixed_order(items), [ann_path], missing)


# ---------------------------------------------------------------- AudioCaps
@_released_format("AudioCaps")
def read_audiocaps(data: str | Path, split: str | None = None) -> Dataset:
    """AudioCaps as released: ``<split>.csv`` (``audiocap_id,youtube_id,start_time,caption``; the
    test split has five rows per clip) and the clips as WAV files, anywhere under ``data``, named by
    ``audiocap_id``, ``youtube_id`` or ``youtube_id_start_time`` (AudioCaps ships no audio; each
    download script names clips one of these ways). One item per clip with its captions."""
    data = _need_dir(data)
    csv_path = _one_file(data, [f"{split}.csv"] if split else ["test.csv", "val.csv", "train.csv"],
                         "AudioCaps CSV (test.csv)", None)
    clips: dict[str, dict[str, Any]] = {}
    with csv_path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        need = {"audiocap_id", "youtube_id", "start_time", "caption"}
        if not need <= set(reader.fieldnames or []):
            raise ValueError(f"{csv_path}: expected the columns {', '.join(sorted(need))}, got {reader.fieldnames}")
        for row in reader:
            key = f"{row['youtube_id']}_{row['start_time']}"
            clip = clips.setdefault(key, {"ids": [], "captions": [], "youtube_id": row["youtube_id"],
                                          "start_time": row["start_time"]})
            clip["ids"].append(row["audiocap_id"])
            clip["captions"].append(row["caption"].strip())
    files = _index_files(data, (".wav", ".flac"))
    items, missing = [], 0
    for key, clip in clips.items():
        names = [*clip["ids"], clip["youtube_id"], key, f"Y{clip['youtube_id']}", f"{key}.000"]
        path = next((files[n + s] for n in names for s in (".wav", ".flac") if n + s in files), None)
        if path is None:
            missing += 1
            continue
        items.append(Item(key, path, clip["captions"], extra={"audiocap_ids": clip["ids"]}))
    return Dataset("AudioCaps", fixed_order(items), [csv_path], missing)


# ---------------------------------------------------------------- MSR-VTT
@_released_format("MSR-VTT")
def read_msrvtt(data: str | Path, split: str | None = "test") -> Dataset:
    """MSR-VTT as released: ``videodatainfo.json`` / ``test_videodatainfo.json`` / ``MSRVTT_data.json``
    (``videos`` with ``video_id`` and ``split``; ``sentences`` with ``video_id`` and ``caption``) and
    ``<video_id>.mp4`` anywhere under ``data`` (``TestVideo/video7010.mp4``). One item per video of
    ``split`` (default test) with its captions."""
    data = _need_dir(data)
    ann_path = _one_file(data, ["*videodatainfo*.json", "MSRVTT_data.json"], "MSR-VTT annotation file "
                         "(videodatainfo.json or MSRVTT_data.json)", None)
    ann = _read_json(ann_path)
    if not isinstance(ann, dict) or not isinstance(ann.get("videos"), list) or not isinstance(ann.get("sentences"), list):
        raise ValueError(f"{ann_path}: not an MSR-VTT annotation file (expected 'videos' and 'sentences' lists)")
    caps: dict[str, list[tuple[Any, str]]] = {}
    for s in ann["sentences"]:
        caps.setdefault(s["video_id"], []).append((s.get("sen_id", 0), str(s["caption"]).strip()))
    files = _index_files(data, (".mp4", ".avi", ".webm"))
    items, missing = [], 0
    for v in ann["videos"]:
        if split is not None and v.get("split", split) != split:
            continue
        vid = v["video_id"]
        path = next((files[vid + s] for s in (".mp4", ".avi", ".webm") if vid + s in files), None)
        if path is None:
            missing += 1
            continue
        captions = [c for _, c in sorted(caps.get(vid, []))]
        if captions:
            items.append(Item(vid, path, captions))
    return Dataset("MSR-VTT", fixed_order(items), [ann_path], missing)


# ---------------------------------------------------------------- VQAv2
@_released_format("VQAv2")
def read_vqav2(data: str | Path, split: str | None = None) -> Dataset:
    """VQAv2 as released: ``v2_OpenEnded_mscoco_<split>_questions.json``,
    ``v2_mscoco_<split>_annotations.json`` and the COCO images, anywhere under ``data``
    (``val2014/COCO_val2014_000000000042.jpg``). One item per question with its ten answers."""
    data = _need_dir(data)
    q_path = _one_file(data, ["*_questions.json"], "VQAv2 questions file (v2_OpenEnded_mscoco_<split>_questions.json)",
                       split)
    a_path = _one_file(data, ["*_annotations.json"], "VQAv2 annotations file (v2_mscoco_<split>_annotations.json)",
                       split)
    questions, annotations = _read_json(q_path), _read_json(a_path)
    if not isinstance(questions, dict) or not isinstance(questions.get("questions"), list):
        raise ValueError(f"{q_path}: not a VQA questions file (expected a 'questions' list)")
    if not isinstance(annotations, dict) or not isinstance(annotations.get("annotations"), list):
        raise ValueError(f"{a_path}: not a VQA annotations file (expected an 'annotations' list)")
    subtype = questions.get("data_subtype") or split or ""
    by_qid = {a["question_id"]: a for a in annotations["annotations"]}
    files = _index_files(data, (".jpg", ".jpeg", ".png"))
    items, missing = [], 0
    for q in questions["questions"]:
        a = by_qid.get(q["question_id"])
        if a is None:
            continue
        name = f"COCO_{subtype}_{int(q['image_id']):012d}.jpg"
        path = files.get(name)
        if path is None:
            missing += 1
            continue
        items.append(Item(str(q["question_id"]), path, question=q["question"],
                          answers=[x["answer"] for x in a["answers"]],
                          extra={"image_id": q["image_id"], "question_type": a.get("question_type"),
                                 "answer_type": a.get("answer_type")}))
    return Dataset("VQAv2", fixed_order(items), [q_path, a_path], missing)


READERS: dict[str, Callable[..., Dataset]] = {
    "coco": read_coco_captions,
    "audiocaps": read_audiocaps,
    "msrvtt": read_msrvtt,
    "vqav2": read_vqav2,
}
