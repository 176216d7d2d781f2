"""Batch generation over a JSONL file of rows: resumable, batched, and shardable across processes.

    anymodal batch prompts.jsonl --out results/ --config tiny --batch-size 8

Each input line is a JSON object::

    {"id": "cat-1", "prompt": "draw a cat", "images": ["in/cat.png"], "settings": {"image": {"num_inference_steps": 20}},
     "max_new_tokens": 32, "seed": 3}

Only ``id`` and ``prompt`` are required. Media paths are relative to the input file (the CLI) or
to ``base_dir`` (the Python API). Every row ends up as one line of ``OUT/results.jsonl`` with its
status (``done`` or ``error``), its output files, text, timings and error. Outputs go to
``OUT/outputs/<stem>/`` where the stem is a file-system-safe name made from the id.

Guarantees:

* **Atomic per row.** A row's output directory is written beside its destination and renamed into
  place, then one complete results line is appended and fsync'd. A kill at any moment leaves either
  a recorded row with all its files, or an unrecorded one whose leftovers the next run replaces.
* **Resumable.** A re-run skips rows recorded as ``done`` (and retries rows that failed). A torn
  last line left by a kill is ignored. At the end ``results.jsonl`` is rewritten in input order
  with exactly one line per row.
* **Bad rows do not stop the run**: a line that is not UTF-8 or not JSON, a missing id or prompt, text
  that is not valid Unicode (a lone surrogate), missing or unreadable media (an oversized or
  decompression-bomb image), unknown or non-finite settings, an over-long prompt are recorded as
  errors with the reason (and the line number where the line itself is bad). A row that fails
  while generating is retried alone, so the other rows of its batch are still recorded.
* **Batched.** Rows with equal settings, ``max_new_tokens`` and seed share one pipeline call, so
  each generator runs once per batch.
* **Scale-out.** Under ``accelerate launch --num_processes N`` process ``r`` takes rows
  ``r, r+N, r+2N, ...``, appends to ``results.part<r>.jsonl``, and the main process merges every
  part into ``results.jsonl`` once all are done.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from .commands import add_model_args, load_pipeline
from .inputs import check_medium, check_seed, check_text, short_int
from .media import MediaError
from .modality import Modality, media_modalities
from .processor import Message
from .utils import atomic_dir, fsync_dir

if TYPE_CHECKING:
    from .pipeline import AnyModalPipeline

logger = logging.getLogger(__name__)

RESULTS_NAME = "results.jsonl"
PART_PATTERN = "results.part*.jsonl"
OUTPUTS_DIR = "outputs"


def row_fields() -> tuple[str, ...]:
    """The fields a row may have: each media modality's plural (``images``...) holds its input files."""
    return ("id", "prompt", *(m.spec.plural for m in media_modalities()), "settings", "max_new_tokens", "seed")

_MAX_STEM = 64


# ==================================================================== rows and results
@dataclass
class InvalidLine:
    """An input line that is not a JSON object; it is recorded as an error row."""

    line: int  # 1-based line number in the input file
    reason: str


@dataclass
class RowResult:
    """What happened to one row; one line of ``results.jsonl``."""

    key: str  # unique per row: the id, or ``id#2``, ``id#3`` for repeats of an id
    id: Any
    index: int  # 0-based position of the row in the input
    status: str  # "done" or "error"
    text: str | None = None
    files: dict[str, list[str]] = field(default_factory=dict)  # by kind; paths relative to the output dir
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    seed: int | None = None
    warning: str | None = None  # done, but short of the request (a medium asked for and not made)
    skipped: bool = False  # recorded as done by an earlier run (not written again)

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data.pop("skipped")
        return _dumps(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RowResult":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def _dumps(record: dict[str, Any]) -> str:
    """One JSON line, readable UTF-8 where the text allows; a lone surrogate (from a ``\\ud800`` escape in
    the input) cannot be written as UTF-8, so such a record is written with ASCII escapes instead."""
    text = json.dumps(record, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(record, ensure_ascii=True)
    return text


@dataclass
class _Row:
    """A validated row, ready to generate."""

    key: str
    id: Any
    index: int
    stem: str
    prompt: str
    media: dict[Modality, list[Path]]
    settings: dict[str, Any]
    max_new_tokens: int | None
    seed: int | None

    def group(self) -> str:
        """Rows in one group can share a pipeline call."""
        return json.dumps([self.settings, self.max_new_tokens, self.seed], sort_keys=True)


class BatchLockedError(RuntimeError):
    """Another run is writing the same results file."""


class RowError(ValueError):
    """A row cannot be generated; the message is recorded as its error."""


# ==================================================================== file names
def safe_stem(key: str) -> str:
    """A file-system-safe, non-hidden name for ``key``, unique in practice.

    Anything but letters, digits, ``.``, ``_`` and ``-`` becomes ``_`` (so ``/`` and ``..``
    cannot traverse), and leading dots and dashes are dropped. When the name had to change, a
    short hash of the original is appended, so ``a/b`` and ``a_b`` stay apart.
    """
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", key).lstrip(".-")[:_MAX_STEM].rstrip(".")
    if stem != key or not stem:
        digest = hashlib.sha1(key.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        stem = f"{stem or 'row'}-{digest}"
    return stem


class _Names:
    """Assigns row keys and stems in input order, so the mapping is the same on every run and process."""

    def __init__(self) -> None:
        self.keys: set[str] = set()
        self.stems: set[str] = set()  # lower-cased: case-insensitive file systems must not merge rows

    def key(self, base: str) -> str:
        key, n = base, 1
        while key in self.keys:
            n += 1
            key = f"{base}#{n}"
        self.keys.add(key)
        return key

    def stem(self, key: str) -> str:
        base = safe_stem(key)
        stem, n = base, 1
        while stem.lower() in self.stems:
            n += 1
            stem = f"{base}-{n}"
        self.stems.add(stem.lower())
        return stem


# ==================================================================== input
def read_rows(path: str | os.PathLike) -> Iterator[dict[str, Any] | InvalidLine]:
    """Parse a JSONL file: one dict per row, an :class:`InvalidLine` for a line that is not a JSON object.

    Blank lines are skipped. Lines are decoded one by one, so a line that is not UTF-8 is one bad row.
    """
    path = Path(path)
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"batch input file not found: {path}") from None
    with handle:
        for n, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield InvalidLine(n, f"line {n}: not valid UTF-8 text (byte 0x{raw[e.start]:02x} at byte {e.start} "
                                     "of the line); save the file as UTF-8")
                continue
            if n == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark some editors write
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as e:
                yield InvalidLine(n, f"line {n}: not valid JSON: {e.msg} (column {e.colno})")
                continue
            except RecursionError:
                yield InvalidLine(n, f"line {n}: the JSON is nested too deeply")
                continue
            except ValueError as e:  # an integer of over 4300 digits: Python refuses to convert it
                yield InvalidLine(n, f"line {n}: {_json_value_error(e)}")
                continue
            if not isinstance(data, dict):
                yield InvalidLine(n, f"line {n}: a row must be a JSON object, got {type(data).__name__}")
                continue
            yield data


def _json_value_error(e: ValueError) -> str:
    if "integer string conversion" in str(e):
        return "a number in the JSON has too many digits (integers are at most 4300 digits; seeds at most 2**63 - 1)"
    return f"not valid JSON: {e}"


def _validate(pipe: AnyModalPipeline, data: dict[str, Any], key: str, index: int, stem: str,
              base_dir: Path, default_max_new_tokens: int | None = None) -> _Row:
    """Check everything about a row that can be checked before generating; raise :class:`RowError`."""
    if isinstance(data["id"], bool) or not isinstance(data["id"], (str, int)):
        raise RowError(f"'id' must be a string or an integer, got {data['id']!r}")
    fields = row_fields()
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise RowError(f"unknown field {unknown[0]!r}; allowed: {', '.join(fields)}")
    prompt = data.get("prompt")
    if not isinstance(prompt, str):
        raise RowError("'prompt' is missing" if prompt is None else
                       f"'prompt' must be a string, got {type(prompt).__name__}")
    try:
        if isinstance(data["id"], str):
            check_text(data["id"], "'id'")
        check_text(prompt, "'prompt'")
    except ValueError as e:
        raise RowError(str(e)) from None
    media: dict[Modality, list[Path]] = {}
    for m in media_modalities():
        name = m.spec.plural
        value = data.get(name)
        if value is None:
            continue
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            raise RowError(f"'{name}' must be a path or a list of paths")
        if items:
            try:
                pipe.processor.check_takes(m)
            except ValueError as e:
                raise RowError(str(e)) from None
        paths = []
        for item in items:
            p = Path(item) if Path(item).is_absolute() else base_dir / item
            if not p.is_file():
                where = f" (looked in {base_dir})" if p != Path(item) else ""
                raise RowError(f"{m.value} file not found: {item}{where}")
            try:
                check_medium(m, p)  # size, animation and layout, from the header only
            except MediaError as e:
                raise RowError(str(e)) from None
            paths.append(p)
        if paths:
            media[m] = paths
    if not prompt.strip() and not media:
        raise RowError("the prompt is empty and the row has no media")
    settings = data.get("settings") or {}
    if not isinstance(settings, dict):
        raise RowError(f"'settings' must be an object keyed by modality, got {type(settings).__name__}")
    try:
        pipe.resolve_settings(settings)  # raises on an unknown modality or field, or a bad value
    except (ValueError, TypeError) as e:
        raise RowError(f"bad settings: {e}") from None
    max_new = data.get("max_new_tokens")
    if max_new is not None and (isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 1):
        raise RowError("'max_new_tokens' must be a positive integer, got "
                       f"{short_int(max_new) if isinstance(max_new, int) and not isinstance(max_new, bool) else repr(max_new)}")
    max_new = max_new or default_max_new_tokens
    try:
        seed = check_seed(data.get("seed"))
    except (ValueError, TypeError) as e:
        raise RowError(str(e).replace("seed", "'seed'", 1)) from None
    _check_length(pipe, prompt, {m: len(v) for m, v in media.items()}, max_new or pipe.config.llm.max_new_tokens)
    return _Row(key, data.get("id"), index, stem, prompt, media, settings, max_new, seed)


def _check_length(pipe: AnyModalPipeline, prompt: str, counts: dict[Modality, int], max_new_tokens: int) -> None:
    proc = pipe.processor
    try:
        proc.check_chars(prompt, pipe.context_length, "'prompt'")  # before tokenising megabytes
        text = proc.format([Message("user", proc.place_media(prompt, counts))])
    except ValueError as e:
        raise RowError(str(e)) from None
    n = proc.num_tokens(text)
    limit = pipe.context_length
    if limit is not None and n + max_new_tokens > limit:
        raise RowError(f"prompt too long: {n} tokens (media positions included) plus max_new_tokens="
                       f"{max_new_tokens} exceeds the model's context of {limit} tokens")


# ==================================================================== results files
def _read_records(path: Path) -> list[dict[str, Any]]:
    """The complete records of a results file. A torn last line (a kill mid-write) is ignored."""
    if not path.is_file():
        return []
    records = []
    lines = path.read_bytes().split(b"\n")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if n < len(lines):  # a complete line that is not JSON: someone edited the file
                logger.warning("%s: line %d is not valid JSON; ignoring it", path, n)
            continue
        if isinstance(rec, dict) and "key" in rec and "status" in rec:
            records.append(rec)
    return records


def _repair_tail(path: Path) -> None:
    """Cut a torn last line, so that the next append starts on a line of its own."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
            f.flush()
            os.fsync(f.fileno())


def _result_files(out_dir: Path) -> list[Path]:
    return [out_dir / RESULTS_NAME, *sorted(out_dir.glob(PART_PATTERN))]


def _latest(out_dir: Path) -> dict[str, dict[str, Any]]:
    """Per key, the record that counts: a ``done`` record wins, else the last one written."""
    best: dict[str, dict[str, Any]] = {}
    for path in _result_files(out_dir):
        for rec in _read_records(path):
            old = best.get(rec["key"])
            if old is None or old["status"] != "done":
                best[rec["key"]] = rec
    return best


def merge_results(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Rewrite ``results.jsonl`` atomically with one record per row, in input order, and drop the part files."""
    from .utils import atomic_write_bytes

    out_dir = Path(out_dir)
    for stale in out_dir.glob(f".{RESULTS_NAME}.*.tmp"):  # a merge that was killed half-way
        stale.unlink()
    records = sorted(_latest(out_dir).values(), key=lambda r: (r.get("index", 1 << 62)))
    atomic_write_bytes(out_dir / RESULTS_NAME, "".join(_dumps(r) + "\n" for r in records).encode("utf-8"))
    fsync_dir(out_dir)
    for part in sorted(out_dir.glob(PART_PATTERN)):
        part.unlink()
    return records


class _ResultsLog:
    """Append-only results file: one complete line per row, flushed and fsync'd before the next row."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = path.open("ab")
        try:
            import fcntl

            fcntl.flock(self._f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # not POSIX: no guard against two runs sharing one output directory
            pass
        except BlockingIOError:
            self._f.close()
            raise BatchLockedError(f"{path} is being written by another batch run; wait for it, or use another "
                               "--out directory") from None
        _repair_tail(path)

    def append(self, result: RowResult) -> None:
        self._f.write(result.to_json().encode("utf-8") + b"\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


def _part_rank(path: Path) -> int | None:
    m = re.fullmatch(r"results\.part(\d+)\.jsonl", path.name)
    return int(m.group(1)) if m else None


def _check_not_busy(path: Path) -> None:
    """Raise :class:`BatchLockedError` if another process holds ``path``'s lock."""
    try:
        import fcntl
    except ImportError:
        return
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BatchLockedError(f"{path} is being written by another batch run (or by a worker that a killed "
                                   "`accelerate launch` left running); stop it, or use another --out directory") from None
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# ==================================================================== outputs
def _write_row(out, i: int, out_dir: Path, stem: str, video_format: str) -> dict[str, list[str]]:
    """Write prompt ``i`` of ``out`` into ``outputs/<stem>/`` atomically and durably (a temporary
    directory swapped into place: a directory left by an attempt killed before it was recorded is
    replaced)."""
    from .outputs import media_suffixes, write_output

    def write(tmp: Path) -> dict[str, list[str]]:
        return {kind: [p.name for p in paths]
                for kind, paths in write_output(out, i, tmp, suffixes=media_suffixes(video_format)).items()}

    names = atomic_dir(out_dir / OUTPUTS_DIR / stem, write, durable=True)
    rel = f"{OUTPUTS_DIR}/{stem}"
    return {kind: [f"{rel}/{n}" for n in ns] for kind, ns in names.items() if ns}


def _remove_stale_temps(out_dir: Path, stems: set[str]) -> None:
    """Remove the temporary directories that a killed run left for these rows (``outputs/.<stem>.*.tmp``).

    Only this process's own rows: other processes may be writing theirs right now.
    """
    parent = out_dir / OUTPUTS_DIR
    if not parent.is_dir():
        return
    for entry in parent.iterdir():
        name = entry.name
        if name.startswith(".") and name.endswith(".tmp") and name[1:].rsplit(".", 2)[0] in stems:
            shutil.rmtree(entry, ignore_errors=True)


# ==================================================================== the run
def run_batch(pipe: AnyModalPipeline, rows: Iterable[dict[str, Any] | InvalidLine], out_dir: str | os.PathLike,
              batch_size: int = 8, *, seed: int | None = 0, base_dir: str | os.PathLike | None = None,
              process_index: int = 0, num_processes: int = 1, max_new_tokens: int | None = None,
              video_format: str = "gif", progress: bool | None = None) -> Iterator[RowResult]:
    """Generate every row not yet done, yielding a :class:`RowResult` per row as it is recorded.

    Args:
        pipe: an :class:`~anymodal.pipeline.AnyModalPipeline`.
        rows: dicts with ``id``, ``prompt`` and optional ``images``/``audios``/``videos`` (paths),
            ``settings`` (``{"image": {...}}``), ``max_new_tokens`` and ``seed``; or
            :class:`InvalidLine` entries from :func:`read_rows`.
        out_dir: where ``results.jsonl`` and ``outputs/`` go. Rows recorded there as done are
            skipped (yielded with ``skipped=True``).
        batch_size: rows per pipeline call; rows are grouped by equal settings, ``max_new_tokens``
            and seed.
        seed: the default seed of rows that give none (media ``k`` of a row use ``seed + k``).
        base_dir: what relative media paths are relative to (default: the current directory).
        max_new_tokens: for rows that give none (default: the config's ``llm.max_new_tokens``).
        process_index, num_processes: this process's shard; with more than one process, results
            go to ``results.part<process_index>.jsonl`` and :func:`merge_results` joins them.
        progress: show a tqdm bar (default: when stderr is a terminal).

    The caller must consume the iterator; results are recorded as it advances. With a single
    process, ``results.jsonl`` is compacted (one line per row, input order) when it is exhausted.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process_index {process_index} is not in [0, num_processes={num_processes})")
    out_dir = Path(out_dir)
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    out_dir.mkdir(parents=True, exist_ok=True)
    log = _open_results_log(out_dir, process_index, num_processes)
    record = None
    try:
        done = {k: r for k, r in _latest(out_dir).items() if r["status"] == "done"}
        mine = _rows_of_process(rows, process_index, num_processes)
        _remove_stale_temps(out_dir, {stem for _, stem, _, _ in mine})
        taken = _stems_taken(done)
        record = _Recorder(log, sum(1 for key, *_ in mine if key not in done), progress, process_index, num_processes)
        groups: dict[str, list[_Row]] = {}
        for key, stem, index, data in mine:
            if key in done:
                record.counts["skipped"] += 1
                yield dataclasses.replace(RowResult.from_dict(done[key]), skipped=True)
                continue
            row = _checked_row(pipe, data, key, stem, index, taken, base, max_new_tokens)
            if isinstance(row, RowResult):  # a bad row, recorded as an error
                yield record(row)
                continue
            group = groups.setdefault(row.group(), [])
            group.append(row)
            if len(group) == batch_size:
                yield from (record(r) for r in _generate(pipe, groups.pop(row.group()), out_dir, seed, video_format))
        for group in groups.values():
            yield from (record(r) for r in _generate(pipe, group, out_dir, seed, video_format))
    finally:
        if record is not None:
            record.bar.close()
        log.close()
    if num_processes == 1:
        merge_results(out_dir)


def _stems_taken(done: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The output stems of rows done earlier, read from their files, by lower-cased stem: a changed
    input must not overwrite them."""
    return {f.split("/")[1].lower(): k for k, r in done.items() for fs in r.get("files", {}).values()
            for f in fs if f.count("/") >= 2}


def _checked_row(pipe: AnyModalPipeline, data: dict[str, Any] | InvalidLine, key: str, stem: str, index: int,
                 taken: dict[str, str], base: Path, max_new_tokens: int | None) -> "_Row | RowResult":
    """The row made ready to generate, or the error result that records why it cannot be."""
    if isinstance(data, InvalidLine):
        return RowResult(key, None, index, "error", error=data.reason)
    if "id" not in data:
        return RowResult(key, None, index, "error", error="the row has no 'id'")
    try:
        if taken.get(stem.lower(), key) != key:
            raise RowError(f"output name {stem!r} belongs to row {taken[stem.lower()]!r}, done by an earlier "
                           "run of a different input; use a new --out directory or distinct ids")
        return _validate(pipe, data, key, index, stem, base, max_new_tokens)
    except RowError as e:
        return RowResult(key, data.get("id"), index, "error", error=str(e))


class _Recorder:
    """Appends each result to the results log and advances the progress bar (tqdm; shown when
    ``progress``, default: when stderr is a terminal)."""

    def __init__(self, log: "_ResultsLog", todo: int, progress: bool | None, process_index: int, num_processes: int):
        from tqdm.auto import tqdm

        self.log = log
        self.counts: Counter = Counter()
        show = sys.stderr.isatty() if progress is None else progress
        self.bar = tqdm(total=todo, unit="row", disable=not show, dynamic_ncols=True,
                        desc="batch" if num_processes == 1 else f"batch [{process_index}/{num_processes}]")

    def __call__(self, result: RowResult) -> RowResult:
        self.log.append(result)
        self.counts[result.status] += 1
        self.counts["warning"] += bool(result.warning)
        self.bar.update(1)
        self.bar.set_postfix(done=self.counts["done"], errors=self.counts["error"], warnings=self.counts["warning"],
                             refresh=False)
        return result


def _open_results_log(out_dir: Path, process_index: int, num_processes: int) -> "_ResultsLog":
    """This process's results log, locked; refuses to start while another run uses the directory."""
    log_path = out_dir / (RESULTS_NAME if num_processes == 1 else f"results.part{process_index}.jsonl")
    log = _ResultsLog(log_path)  # locked first: a second run on the same directory stops here
    # Results files that no process of this run writes must not be in use either (a run with a
    # different number of processes, or workers a killed launcher left running).
    others = [out_dir / RESULTS_NAME] if num_processes > 1 else []
    others += [p for p in out_dir.glob(PART_PATTERN)
               if num_processes == 1 or _part_rank(p) is None or _part_rank(p) >= num_processes]
    try:
        for path in others:
            _check_not_busy(path)
    except BaseException:
        log.close()
        raise
    return log


def _rows_of_process(rows: Iterable[dict[str, Any] | InvalidLine], process_index: int, num_processes: int
                     ) -> list[tuple[str, str, int, dict[str, Any] | InvalidLine]]:
    """``(key, stem, index, row)`` of this process's rows. Every process names every row, so keys and
    stems agree across processes and runs."""
    names = _Names()
    mine = []
    for index, data in enumerate(rows):
        if isinstance(data, InvalidLine):
            key = names.key(f"line:{data.line}")
        elif "id" not in data:
            key = names.key(f"row:{index}")
        else:
            key = names.key(str(data["id"]))
        stem = names.stem(key)
        if index % num_processes == process_index:
            mine.append((key, stem, index, data))
    return mine


def _generate(pipe: AnyModalPipeline, rows: list[_Row], out_dir: Path, seed: int | None,
              video_format: str) -> list[RowResult]:
    """One pipeline call for ``rows`` (equal settings). If it fails, retry row by row so only bad rows fail."""
    row_seed = rows[0].seed if rows[0].seed is not None else seed
    start = time.perf_counter()
    try:
        out = pipe([r.prompt for r in rows],
                   **{m.spec.plural: [[str(p) for p in r.media.get(m, [])] or None for r in rows]
                      for m in media_modalities() if any(m in r.media for r in rows)},
                   settings=rows[0].settings or None, max_new_tokens=rows[0].max_new_tokens, seed=row_seed,
                   progress=False)
    except Exception as e:  # whatever one row did, the rest of its batch is still generated and recorded
        if len(rows) > 1:
            return [res for r in rows for res in _generate(pipe, [r], out_dir, seed, video_format)]
        return [RowResult(rows[0].key, rows[0].id, rows[0].index, "error", error=f"{type(e).__name__}: {e}",
                          seed=row_seed)]
    generate_s = time.perf_counter() - start
    results = []
    for i, r in enumerate(rows):
        t0 = time.perf_counter()
        try:
            files = _write_row(out, i, out_dir, r.stem, video_format)
        except OSError as e:
            results.append(RowResult(r.key, r.id, r.index, "error", error=f"could not write outputs: {e}",
                                     seed=row_seed))
            continue
        timings = {"generate_s": round(generate_s / len(rows), 4), "write_s": round(time.perf_counter() - t0, 4),
                   "batch_s": round(generate_s, 4), "batch_size": len(rows)}
        results.append(RowResult(r.key, r.id, r.index, "done", text=out.text[i], files=files, timings=timings,
                                 seed=row_seed, warning="; ".join(out.warnings[i]) or None))
    return results


@dataclass
class Summary:
    done: int = 0
    errors: int = 0
    skipped: int = 0
    warnings: int = 0
    seconds: float = 0.0
    reasons: Counter = field(default_factory=Counter)

    def add(self, r: RowResult) -> None:
        if r.skipped:
            self.skipped += 1
        elif r.status == "done":
            self.done += 1
            self.warnings += bool(r.warning)
        else:
            self.errors += 1
            self.reasons[r.error or "unknown"] += 1

    def format(self, results_path: Path) -> str:
        rate = self.done / self.seconds if self.seconds else 0.0
        lines = [f"{self.done} done, {self.errors} errors, {self.skipped} skipped (done earlier) in "
                 f"{self.seconds:.1f} s ({rate:.2f} rows/s); results: {results_path}"]
        if self.warnings:
            lines.append(f"  {self.warnings} done row(s) have a warning (a requested medium was not made; "
                         f"see their 'warning' field)")
        for reason, n in self.reasons.most_common(5):
            lines.append(f"  error x{n}: {reason}")
        if len(self.reasons) > 5:
            lines.append(f"  ... and {len(self.reasons) - 5} other error reasons (see {results_path.name})")
        return "\n".join(lines)


# ==================================================================== CLI
def batch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="a JSONL file: one {\"id\", \"prompt\", ...} object per line")
    p.add_argument("--out", required=True, help="output directory (results.jsonl and outputs/)")
    add_model_args(p, device_note="; under accelerate launch, --device cuda gives each process its own GPU")
    p.add_argument("--batch-size", type=int, default=8, help="rows per pipeline call (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of rows that give none (default 0)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="for rows that give none (default: the config's llm.max_new_tokens)")
    p.add_argument("--video-format", choices=["gif", "mp4"], default="gif",
                   help="file type of generated videos (default gif; mp4 needs imageio-ffmpeg)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def batch_command(args: argparse.Namespace) -> int:
    import torch

    input_path = Path(args.input)
    if not input_path.is_file():
        raise FileNotFoundError(f"batch input file not found: {input_path}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {args.batch_size}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be a positive integer, got {args.max_new_tokens}")
    state = _distributed_state()
    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    device = args.device
    if device in ("cuda", "auto") and state is not None and state.device.type == "cuda":
        device = str(state.device)  # under accelerate launch: one GPU per process
    torch.manual_seed(args.seed)  # every process builds the same randomly initialised components
    pipe = load_pipeline(args.model, args.config, device)
    out_dir = Path(args.out)
    summary = Summary()
    start = time.perf_counter()
    try:
        for result in run_batch(pipe, read_rows(input_path), out_dir, args.batch_size, seed=args.seed,
                                base_dir=input_path.parent, process_index=rank, num_processes=world,
                                max_new_tokens=args.max_new_tokens, video_format=args.video_format,
                                progress=not args.no_progress):
            summary.add(result)
    except BatchLockedError as e:
        print(f"anymodal batch: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted after {summary.done} done and {summary.errors} failed rows; every recorded row is "
              "complete: run the same command again to go on", file=sys.stderr)
        return 130
    summary.seconds = time.perf_counter() - start
    if world > 1:
        print(f"[process {rank}/{world}] " + summary.format(out_dir / f"results.part{rank}.jsonl").splitlines()[0],
              file=sys.stderr)
        state.wait_for_everyone()
        if state.is_main_process:
            records = merge_results(out_dir)
            merged = Counter(r["status"] for r in records)
            print(f"merged {world} processes: {merged['done']} done, {merged['error']} errors, "
                  f"{len(records)} rows in {out_dir / RESULTS_NAME}")
        state.wait_for_everyone()
    else:
        print(summary.format(out_dir / RESULTS_NAME))
    return 0


def _distributed_state():
    """accelerate's ``PartialState`` when launched with several processes, else ``None``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    import torch
    from accelerate import PartialState
    from accelerate.utils import str_to_bool

    # PartialState() ignores ACCELERATE_USE_CPU (Accelerator reads it); without cpu=True a CPU-only
    # launch would silently run every process as a lone process over all rows.
    cpu = str_to_bool(os.environ.get("ACCELERATE_USE_CPU", "false")) == 1 or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    if state.num_processes != world:
        raise RuntimeError(f"launched as {world} processes but accelerate set up {state.num_processes}; "
                           "refusing to run so that processes do not write the same rows")
    return state

