"""Training data: JSONL manifests, per-stage samples, and batched collation.

Two manifest row kinds (paths are relative to the manifest file):

* caption pair: ``{"modality": "image", "media": "images/0001.png", "caption": "a red circle"}``
* dialogue: ``{"messages": [{"role": "user", "content": ["what is this?", {"image": "img/1.png"}]},
  {"role": "assistant", "content": ["here is one: ", {"image": null, "caption": "a blue square"}]}]}``

In a dialogue, ``content`` is a string or a list of strings and media references. A reference
in a user turn is an input (its file is read and encoded); in an assistant turn it is a medium
the model must generate: it becomes the signal tokens, and its ``caption`` (optional) is the
text the output projector's conditioning is aligned with; for a generator whose targets come
from media (``targets_from = "media"``, e.g. unCLIP) the target is the generator's encoding of
its file instead (see docs/training.md, "Targets from media").

A bad row (invalid JSON, missing field, unknown modality, missing or unreadable file, empty
caption, too long) is reported with its line number, skipped and counted. Files are checked
when the manifest loads; media are decoded in DataLoader workers, and a row whose medium
cannot be decoded there travels back in the batch as a :class:`BadRow`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import Dataset

from anymodal.media import MediaError
from anymodal.modality import Modality, media_modalities
from anymodal.processor import AnyModalProcessor, Message

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


# ============================================================================ records
@dataclass
class MediaRef:
    modality: Modality
    path: Path | None = None
    caption: str | None = None


@dataclass
class CaptionRecord:
    line: int
    modality: Modality
    path: Path | None
    caption: str


@dataclass
class Turn:
    role: str
    parts: list[str | MediaRef]


@dataclass
class DialogueRecord:
    line: int
    turns: list[Turn]


Record = CaptionRecord | DialogueRecord


@dataclass
class BadRow:
    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


@dataclass
class ManifestRequirements:
    """What a stage needs from a row: which modalities it can read and generate, and which files."""

    row_kinds: tuple[str, ...]  # "caption", "dialogue"
    input_modalities: frozenset[Modality]  # media the model can read (input projectors)
    output_modalities: frozenset[Modality]  # media the model can generate (generators)
    caption_role: str  # "input": caption pairs describe an input medium; "output": a medium to generate
    caption_needs_file: bool  # stage 1 reads the medium; stage 2 only when the denoising loss is on
    # outputs whose alignment targets come from the target medium (a generator's encode_media): their
    # stage-2 caption pairs need the file
    media_targets: frozenset[Modality] = frozenset()


@dataclass
class Manifest:
    path: Path
    records: list[Record]
    bad: list[BadRow]
    total: int

    @property
    def bad_fraction(self) -> float:
        return len(self.bad) / self.total if self.total else 0.0

    def check(self, max_bad_fraction: float, runtime_bad: int = 0) -> None:
        """Raise when the share of bad rows exceeds ``max_bad_fraction``."""
        if self.total == 0:
            raise ValueError(f"{self.path}: the manifest has no rows")
        n_bad = len(self.bad) + runtime_bad
        if not self.records:
            raise ValueError(f"{self.path}: all {self.total} rows are bad; first: {self.bad[0] if self.bad else '?'}")
        if n_bad / self.total > max_bad_fraction:
            first = "; ".join(str(b) for b in self.bad[:3])
            raise ValueError(f"{self.path}: {n_bad} of {self.total} rows are bad ({n_bad / self.total:.1%}), more "
                             f"than training.max_bad_fraction ({max_bad_fraction:.1%})" + (f"; first: {first}" if first else ""))


def load_manifest(path: str | os.PathLike, req: ManifestRequirements, log: bool = True) -> Manifest:
    """Read a JSONL manifest; bad rows are logged (``log``) with their line number and collected, not raised."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    root = path.resolve().parent
    records: list[Record] = []
    bad: list[BadRow] = []
    total = 0
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            total += 1
            try:
                records.append(_parse_row(line, line_no, root, req))
            except _Bad as e:
                bad.append(BadRow(line_no, str(e)))
                if log:
                    logger.warning("%s:%d: %s; row skipped", path, line_no, e)
    return Manifest(path, records, bad, total)


class _Bad(Exception):
    pass


def _parse_row(line: str, line_no: int, root: Path, req: ManifestRequirements) -> Record:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise _Bad(f"not valid JSON ({e.msg})") from None
    except RecursionError:
        raise _Bad("the JSON is nested too deeply") from None
    except ValueError:  # an integer of over 4300 digits, which Python refuses to convert
        raise _Bad("a number in the JSON has too many digits") from None
    if not isinstance(row, dict):
        raise _Bad(f"a row must be a JSON object, got {type(row).__name__}")
    if "messages" in row:
        if "dialogue" not in req.row_kinds:
            raise _Bad("a dialogue row, but this stage trains on caption pairs")
        return _parse_dialogue(row, line_no, root, req)
    if "caption" in row:
        if "caption" not in req.row_kinds:
            raise _Bad("a caption-pair row, but this stage trains on dialogues")
        return _parse_caption(row, line_no, root, req)
    raise _Bad("a row needs 'caption' (caption pair) or 'messages' (dialogue)")


def _modality(value: Any, allowed: frozenset[Modality], what: str) -> Modality:
    try:
        m = Modality.parse(value)
    except ValueError as e:
        raise _Bad(str(e)) from None
    if m not in media_modalities():
        raise _Bad(f"{m.value!r} is not a media modality")
    if m not in allowed:
        raise _Bad(f"this model cannot {what} {m.value} (it can {what} "
                   f"{', '.join(sorted(x.value for x in allowed)) or 'none'})")
    return m


def _media_path(value: Any, root: Path) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise _Bad(f"media path must be a non-empty string, got {value!r}")
    p = Path(value)
    p = p if p.is_absolute() else root / p
    if not p.is_file():
        raise _Bad(f"media file not found: {value}")
    return p


def _caption(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Bad(f"caption must be a non-empty string, got {value!r}")
    return value.strip()


def _parse_caption(row: dict, line_no: int, root: Path, req: ManifestRequirements) -> CaptionRecord:
    # Other fields (an id, a duration, a licence) are the dataset's own and are ignored.
    if "modality" not in row:
        raise _Bad("missing field 'modality'")
    allowed = req.input_modalities if req.caption_role == "input" else req.output_modalities
    m = _modality(row["modality"], allowed, "read" if req.caption_role == "input" else "generate")
    caption = _caption(row.get("caption"))
    path = None
    from_media = req.caption_role == "output" and m in req.media_targets
    if req.caption_needs_file or from_media:
        if "media" not in row:
            raise _Bad("missing field 'media'" + (f" (the {m.value} generator's alignment target is its encoding "
                                                  "of the target medium)" if from_media else ""))
        path = _media_path(row["media"], root)
    return CaptionRecord(line_no, m, path, caption)


def _parse_dialogue(row: dict, line_no: int, root: Path, req: ManifestRequirements) -> DialogueRecord:
    msgs = row["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise _Bad("'messages' must be a non-empty list of turns")
    turns = []
    for k, msg in enumerate(msgs):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise _Bad(f"messages[{k}] must be an object with 'role' and 'content'")
        role = msg["role"]
        if role not in ("system", "user", "assistant"):
            raise _Bad(f"messages[{k}].role must be system, user or assistant, got {role!r}")
        content = msg["content"]
        items = [content] if isinstance(content, (str, dict)) else content
        if not isinstance(items, list):
            raise _Bad(f"messages[{k}].content must be a string or a list, got {type(content).__name__}")
        parts: list[str | MediaRef] = []
        for item in items:
            if isinstance(item, str):
                parts.append(item)
            elif isinstance(item, dict):
                parts.append(_parse_ref(item, k, role, root, req))
            else:
                raise _Bad(f"messages[{k}].content items must be strings or media objects, got {item!r}")
        if role == "system" and any(isinstance(p, MediaRef) for p in parts):
            raise _Bad(f"messages[{k}]: a system turn cannot hold media")
        turns.append(Turn(role, parts))
    if not any(t.role == "assistant" for t in turns):
        raise _Bad("a dialogue needs at least one assistant turn (the loss applies only to assistant turns)")
    return DialogueRecord(line_no, turns)


def _parse_ref(item: dict, k: int, role: str, root: Path, req: ManifestRequirements) -> MediaRef:
    keys = [m.value for m in media_modalities() if m.value in item]
    if len(keys) != 1:
        raise _Bad(f"messages[{k}]: a media object names exactly one modality key (image, audio or video), "
                   f"got {sorted(item)}")
    unknown = sorted(set(item) - {keys[0], "caption"})
    if unknown:
        raise _Bad(f"messages[{k}]: unknown media field {unknown[0]!r}")
    value = item[keys[0]]
    if role == "user":
        m = _modality(keys[0], req.input_modalities, "read")
        return MediaRef(m, _media_path(value, root), None)
    m = _modality(keys[0], req.output_modalities, "generate")
    caption = _caption(item["caption"]) if "caption" in item else None
    path = _media_path(value, root) if value is not None else None
    return MediaRef(m, path, caption)


# ============================================================================ rendering
def render_dialogue(processor: AnyModalProcessor, messages: Sequence[Message]) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as text, plus the character span of everything each assistant turn adds.

    A span starts after the generation prompt (what the model sees before it answers) and
    ends with the template's end-of-turn marker (EOS for templates without one).
    """
    msgs = list(messages)
    spans = []
    for i, msg in enumerate(msgs):
        if msg.role != "assistant":
            continue
        before = processor.format(msgs[:i], add_generation_prompt=True)
        through = processor.format(msgs[: i + 1], add_generation_prompt=False)
        if not through.startswith(before):
            raise ValueError("the chat template does not render a conversation as a prefix of its continuation, so "
                             "assistant turns cannot be located for the loss mask")
        # Trailing whitespace after the end-of-turn marker is never generated (generation stops
        # at the marker), so it is not learned either.
        spans.append((len(before), len(through.rstrip())))
    return processor.format(msgs, add_generation_prompt=False), spans


# ============================================================================ samples and batches
@dataclass
class Sample:
    line: int
    input_ids: list[int]
    labels: list[int]
    media: dict[Modality, list[torch.Tensor]] = field(default_factory=dict)  # inputs, each (1, ...)
    # per output block in reading order: the conditioning targets, or None when there is no caption
    targets: dict[Modality, list[dict[str, torch.Tensor] | None]] = field(default_factory=dict)
    denoise: dict[Modality, list[torch.Tensor | None]] = field(default_factory=dict)  # target media (C, H, W)


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    media: dict[Modality, torch.Tensor]
    targets: dict[Modality, dict[str, torch.Tensor]]  # (n_blocks, seq, dim); zeros where target_mask is False
    target_mask: dict[Modality, torch.Tensor]  # (n_blocks,) bool
    denoise: dict[Modality, torch.Tensor]  # (n_blocks_with_media, C, H, W)
    denoise_index: dict[Modality, torch.Tensor]  # which signal block each denoise row belongs to
    lines: list[int]
    bad: list[BadRow]

    @property
    def size(self) -> int:
        return len(self.lines)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        def mv(x):
            return x.to(device, non_blocking=non_blocking)

        return Batch(mv(self.input_ids), mv(self.attention_mask), mv(self.labels),
                     {m: mv(t) for m, t in self.media.items()},
                     {m: {k: mv(v) for k, v in d.items()} for m, d in self.targets.items()},
                     {m: mv(t) for m, t in self.target_mask.items()},
                     {m: mv(t) for m, t in self.denoise.items()},
                     {m: mv(t) for m, t in self.denoise_index.items()}, self.lines, self.bad)


class Collator:
    """Pads token ids (``pad_id``) and labels (-100) on one side and stacks media and targets."""

    def __init__(self, pad_id: int, padding_side: str = "right"):
        self.pad_id, self.padding_side = pad_id, padding_side

    def __call__(self, items: list[Sample | BadRow]) -> Batch:
        samples = [s for s in items if isinstance(s, Sample)]
        bad = [b for b in items if isinstance(b, BadRow)]
        width = max((len(s.input_ids) for s in samples), default=1)
        n = len(samples)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, s in enumerate(samples):
            k = len(s.input_ids)
            sl = slice(0, k) if self.padding_side == "right" else slice(width - k, width)
            ids[i, sl] = torch.tensor(s.input_ids)
            labels[i, sl] = torch.tensor(s.labels)
            mask[i, sl] = 1
        media = {m: torch.cat([t for s in samples for t in s.media.get(m, [])])
                 for m in media_modalities() if any(s.media.get(m) for s in samples)}
        targets: dict[Modality, dict[str, torch.Tensor]] = {}
        target_mask: dict[Modality, torch.Tensor] = {}
        denoise: dict[Modality, torch.Tensor] = {}
        denoise_index: dict[Modality, torch.Tensor] = {}
        for m in media_modalities():
            blocks = [t for s in samples for t in s.targets.get(m, [])]
            if blocks and any(b is not None for b in blocks):
                ref = next(b for b in blocks if b is not None)
                targets[m] = {k: torch.stack([b[k] if b is not None else torch.zeros_like(v) for b in blocks])
                              for k, v in ref.items()}
                target_mask[m] = torch.tensor([b is not None for b in blocks])
            media_out = [t for s in samples for t in s.denoise.get(m, [])]
            if any(t is not None for t in media_out):
                denoise[m] = torch.stack([t for t in media_out if t is not None])
                denoise_index[m] = torch.tensor([i for i, t in enumerate(media_out) if t is not None])
        return Batch(ids, mask, labels, media, targets, target_mask, denoise, denoise_index,
                     [s.line for s in samples], bad)


# ============================================================================ target cache
class TargetCache:
    """Alignment targets, one safetensors file each: a generator's own text conditioning of a caption,
    or, for a generator whose ``targets_from`` is ``"media"`` (``media_modalities``), its conditioning
    of the target medium (``encode_media``), keyed by the file's SHA-256.

    Keyed by generator identity (:func:`generator_identity`) and caption or file content, so a cache
    directory can be shared between runs and stages, and a different encoder never reuses a target.
    """

    def __init__(self, directory: str | os.PathLike, identities: dict[Modality, str],
                 media_modalities: Sequence[Modality] = ()):
        self.directory = Path(directory)
        self.identities = dict(identities)
        self.media_modalities = frozenset(media_modalities)
        self.media_keys: dict[str, str] = {}  # file path -> content key, filled by fill_media

    def target(self, modality: Modality, caption: str | None, path: Path | None) -> dict[str, torch.Tensor] | None:
        """The alignment target of one output: from its file for a media-target modality, else from its
        caption; None when the output has neither (it then trains on the token loss alone)."""
        if modality not in self.media_modalities:
            return self.load(modality, caption) if caption else None
        if path is None:
            return None
        key = self.media_keys.get(str(path))
        if key is None or not self.path(modality, key).is_file():
            raise _Bad(f"no {modality.value} alignment target for '{path}': the file could not be encoded")
        return self._read(modality, key, "media")

    def path(self, modality: Modality, caption: str) -> Path:
        h = hashlib.sha256(caption.encode("utf-8")).hexdigest()
        return self.directory / self.identities[modality] / h[:2] / f"{h}.safetensors"

    def load(self, modality: Modality, caption: str) -> dict[str, torch.Tensor]:
        return self._read(modality, caption, "caption")

    def _read(self, modality: Modality, key: str, kind: str) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        path = self.path(modality, key)
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get(kind) != key:  # a hash collision, or a foreign file
                raise ValueError(f"target cache entry {path} is not for {kind} {key!r}")
            return {k: f.get_tensor(k) for k in f.keys()}

    def fill(self, modality: Modality, captions: Sequence[str], encode: Callable[[list[str]], dict[str, torch.Tensor]],
             batch_size: int = 32) -> int:
        """Compute and store the targets not cached yet; returns how many were computed."""
        from safetensors.torch import save_file

        from anymodal.utils import atomic_path

        todo = sorted({c for c in captions if not self.path(modality, c).is_file()})
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            self._store(modality, chunk, "caption", encode(chunk))
        return len(todo)

    def fill_media(self, modality: Modality, paths: Sequence[Path], encode: Callable[[list], dict[str, torch.Tensor]],
                   batch_size: int = 32) -> tuple[int, list[str]]:
        """Compute and store the targets of the media files not cached yet (``encode`` takes paths).
        Returns how many were computed and the reasons for files that could not be encoded (their
        rows become bad rows when read)."""
        todo: dict[str, Path] = {}
        for p in paths:
            key = self.media_keys.get(str(p)) or file_key(p)
            self.media_keys[str(p)] = key
            if not self.path(modality, key).is_file():
                todo.setdefault(key, Path(p))
        keys = sorted(todo)
        failed: list[str] = []
        for start in range(0, len(keys), batch_size):
            chunk = keys[start:start + batch_size]
            try:
                self._store(modality, chunk, "media", encode([todo[k] for k in chunk]))
            except (MediaError, OSError, ValueError):
                for k in chunk:  # find the files that fail; encode the others one by one
                    try:
                        self._store(modality, [k], "media", encode([todo[k]]))
                    except (MediaError, OSError, ValueError) as e:
                        failed.append(f"{todo[k]}: {e}")
        return len(keys) - len(failed), failed

    def _store(self, modality: Modality, keys: list[str], kind: str, out: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        from anymodal.utils import atomic_path

        for i, key in enumerate(keys):
            tensors = {k: v[i].detach().to("cpu", torch.float32).contiguous() for k, v in out.items()}
            with atomic_path(self.path(modality, key)) as tmp:
                save_file(tensors, str(tmp), metadata={kind: key})


def file_key(path: str | os.PathLike) -> str:
    """A media file's cache key: the SHA-256 of its bytes (the same file anywhere shares a target)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def _probe_image() -> Any:
    """A fixed 64 x 64 colour gradient, the probe of image generators whose targets come from images."""
    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 255, 64, dtype=np.float32)
    rgb = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], 255 - ramp[None, :]), axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


MEDIA_PROBES: dict[Modality, Callable[[], Any]] = {Modality.IMAGE: _probe_image}


def generator_identity(modality: Modality, generator: Any) -> str:
    """A short stable name for what a generator's ``encode_text`` (or ``encode_media``) computes.

    It hashes the generator's config and its conditioning of a fixed probe text or medium
    (rounded, so that the same weights on another device give the same name).
    """
    cfg = generator.config
    spec = json.dumps({"type": cfg.type, "pretrained": cfg.pretrained, "components": cfg.components,
                       "dtype": cfg.dtype}, sort_keys=True, default=str)
    h = hashlib.sha256(spec.encode())
    if generator.targets_from == "media":
        if modality not in MEDIA_PROBES:
            raise ValueError(f"alignment targets from {modality.value} media are not supported (only "
                             f"{', '.join(m.value for m in MEDIA_PROBES)}); generator {cfg.type!r}")
        probe = generator.encode_media([MEDIA_PROBES[modality]()])
    else:
        probe = generator.encode_text(["anymodal target-cache probe"])
    for k in sorted(probe):
        h.update(k.encode())
        h.update(probe[k].detach().float().cpu().round(decimals=3).numpy().tobytes())
    return f"{modality.value}-{cfg.type}-{h.hexdigest()[:16]}"


# ============================================================================ dataset
class SampleBuilder:
    """Turns a record into token ids, loss labels, preprocessed media and alignment targets.

    It runs in DataLoader workers, so it holds only what a worker needs: the processor, the
    encoders' ``preprocess`` callables and the target cache.
    """

    def __init__(self, stage: int, processor: AnyModalProcessor, preprocess: dict[Modality, Callable],
                 caption_prompt: str, generation_prompt: str, generation_response: str,
                 targets: TargetCache | None = None, denoise: dict[Modality, Callable] | None = None,
                 max_length: int | None = None):
        self.stage = stage
        self.processor = processor
        self.preprocess = preprocess
        self.caption_prompt, self.generation_prompt = caption_prompt, generation_prompt
        self.generation_response = generation_response
        self.targets = targets
        self.denoise = denoise or {}
        self.max_length = max_length
        self.eos = processor.turn_end
        self.reserved = list(self.processor.placeholders.values())
        self.reserved += [s for m in processor.signal_tokens for s in processor.signal_strings[m]]

    def __call__(self, record: Record) -> Sample | BadRow:
        try:
            return self._build(record)
        except (MediaError, _Bad) as e:
            return BadRow(record.line, str(e))
        except (OSError, ValueError) as e:  # a decoder's own error on a corrupt file
            return BadRow(record.line, f"{type(e).__name__}: {e}")

    # -- text pieces
    def _signal(self, m: Modality) -> str:
        if m not in self.processor.signal_tokens:
            raise _Bad(f"the model has no signal tokens for {m.value}")
        return "".join(self.processor.signal_strings[m])

    def _placeholder(self, m: Modality) -> str:
        return m.spec.placeholder * self.processor.media_tokens.get(m, 1)

    def _check_text(self, text: str) -> str:
        for r in self.reserved:
            if r in text:
                raise _Bad(f"text contains the reserved token {r!r}; reference media with objects such as "
                           f"{{\"image\": \"path.png\"}} instead")
        return text

    def _build(self, record: Record) -> Sample:
        media: dict[Modality, list[torch.Tensor]] = {}
        targets: dict[Modality, list] = {}
        denoise: dict[Modality, list] = {}

        def add_input(ref: MediaRef) -> str:
            media.setdefault(ref.modality, []).append(self.preprocess[ref.modality](ref.modality, [ref.path]))
            return self._placeholder(ref.modality)

        def add_output(ref: MediaRef) -> str:
            m = ref.modality
            targets.setdefault(m, []).append(
                self.targets.target(m, ref.caption, ref.path) if self.targets is not None else None)
            fn = self.denoise.get(m)
            denoise.setdefault(m, []).append(fn(ref.path) if fn is not None and ref.path is not None else None)
            return self._signal(m)

        if isinstance(record, CaptionRecord):
            caption = self._check_text(record.caption)
            m = record.modality
            if self.stage == 1:
                user = add_input(MediaRef(m, record.path)) + "\n" + self.caption_prompt.format(modality=m.value)
                answer = caption
            else:
                user = self.generation_prompt.format(caption=caption, modality=m.value)
                signal = add_output(MediaRef(m, record.path, caption))
                answer = self.generation_response.format(caption=caption, modality=m.value, signal=signal)
            messages = [Message("user", user), Message("assistant", answer + self.eos)]
        else:
            messages = []
            for turn in record.turns:
                pieces = []
                for part in turn.parts:
                    if isinstance(part, str):
                        pieces.append(self._check_text(part))
                    elif turn.role == "user":
                        pieces.append(add_input(part))
                    else:
                        pieces.append(add_output(part))
                text = "".join(pieces)
                messages.append(Message(turn.role, text + (self.eos if turn.role == "assistant" else "")))

        text, spans = render_dialogue(self.processor, messages)
        enc = self.processor.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        if self.max_length is not None and len(ids) > self.max_length:
            raise _Bad(f"{len(ids)} tokens (media positions included), more than the limit of {self.max_length}")
        labels = [IGNORE_INDEX] * len(ids)
        for j, (start, _) in enumerate(enc["offset_mapping"]):
            if any(a <= start < b for a, b in spans):
                labels[j] = ids[j]
        if all(x == IGNORE_INDEX for x in labels):
            raise _Bad("no assistant tokens to learn from")
        self._check_positions(ids, media, targets)
        return Sample(record.line, ids, labels, media, targets, denoise)

    def _check_positions(self, ids: list[int], media: dict, targets: dict) -> None:
        # A tokenizer that split a placeholder would misalign features; fail the row, not the run.
        for m, items in media.items():
            want = len(items) * self.processor.media_tokens.get(m, 1)
            got = ids.count(self.processor.placeholder_ids[m])
            if got != want:
                raise _Bad(f"{m.value}: {got} placeholder positions for {len(items)} media ({want} expected)")
        for m, blocks in targets.items():
            got = ids.count(self.processor.signal_ids[m][0])
            if got != len(blocks):
                raise _Bad(f"{m.value}: {got} signal blocks in the tokens for {len(blocks)} outputs")


class ManifestDataset(Dataset):
    def __init__(self, records: Sequence[Record], builder: SampleBuilder):
        self.records = list(records)
        self.builder = builder

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample | BadRow:
        return self.builder(self.records[index])


def requirements(stage: int, input_modalities: Sequence[Modality], output_modalities: Sequence[Modality],
                 denoise: bool = False, media_targets: Sequence[Modality] = ()) -> ManifestRequirements:
    """What each stage reads: stage 1 caption pairs of inputs, stage 2 caption pairs of outputs
    (the file is read for the denoising loss, and for outputs in ``media_targets``, whose
    alignment targets come from the target medium), stage 3 dialogues."""
    ins, outs = frozenset(input_modalities), frozenset(output_modalities)
    media = frozenset(media_targets)
    if stage == 1:
        return ManifestRequirements(("caption",), ins, outs, "input", True, media)
    if stage == 2:
        return ManifestRequirements(("caption",), ins, outs, "output", denoise, media)
    return ManifestRequirements(("dialogue",), ins, outs, "input", True, media)
