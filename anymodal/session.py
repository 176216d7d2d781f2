"""Dialogue sessions: multi-turn conversations with media going both ways.

    session = ChatSession(pipe, seed=0)
    turn = session.send("draw a cat")           # turn.text == "a cat <image>", turn.images == [<PIL image>]
    turn = session.send("now this one", images=["dog.png"])
    session.save("chats/cat")                     # session.json + media files, atomically
    again = ChatSession.load("chats/cat", pipe)   # continues exactly where it stopped

**Context.** Every earlier turn stays in the prompt with its media. Media the user sent are
encoded again each turn. An earlier reply is, by default (``history_media="signal"``), what the
model produced: its own token ids, signal blocks and end of turn included, which is how stage 3
trains on dialogues (NExT-GPT's too), so turn 5 looks to the model like the dialogues it learned
from. With ``history_media="input"`` media the model generated are instead fed back as inputs when
the model has an encoder for that modality (so it can be asked about them); otherwise their
placeholder is dropped from the context text (the model cannot see them).

**Context-length policy.** The rendered prompt plus ``max_new_tokens`` must fit the model's
context (``llm.max_length``, else the LLM's ``max_position_embeddings``). When it does not, the
oldest exchanges (a user turn and its reply) are left out of the prompt, one at a time, until it
fits; the system prompt is always kept. The session itself keeps every turn (they are saved and
shown); only the prompt is shortened. If the new user turn alone does not fit, ``send`` raises
``ValueError`` and the session is unchanged.

**Seeds.** ``send(seed=...)`` seeds that turn; without one, a session created with ``seed=s``
uses ``s + n`` for its ``n``-th reply, so a saved and reloaded session gives the same next reply.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence


from .media import MediaError
from .modality import MediaFields, Modality, media_by_plural
from .processor import Message
from .utils import atomic_dir, check_replaceable, recover_swapped_dir

if TYPE_CHECKING:
    from .pipeline import AnyModalPipeline

SESSION_FILE = "session.json"
FORMAT_VERSION = 1


@dataclass
class Turn(MediaFields):
    """One message of a session. ``text`` marks each medium with its placeholder (``<image>``...).

    For a user turn ``media`` holds what was sent (paths, PIL images, ``Audio``...); for an
    assistant turn, what the model generated (PIL images, ``Audio``, lists of frames).
    """

    role: str  # "user" or "assistant"
    text: str
    media: dict[Modality, list[Any]] = field(default_factory=dict)
    seed: int | None = None  # the seed the reply was generated with (assistant turns)
    token_ids: list[int] = field(default_factory=list)  # generated ids (assistant turns)


HISTORY_MEDIA = ("signal", "input")  # how earlier replies' media enter the prompt (see the module docstring)


class ChatSession:
    """A conversation with an :class:`~anymodal.pipeline.AnyModalPipeline`; see the module docstring."""

    def __init__(self, pipe: AnyModalPipeline, *, system_prompt: str | None = None, seed: int | None = 0,
                 max_new_tokens: int | None = None, settings: dict[str, Any] | None = None,
                 history_media: str = "signal"):
        if history_media not in HISTORY_MEDIA:
            raise ValueError(f"history_media must be one of {', '.join(HISTORY_MEDIA)}, got {history_media!r}")
        self.history_media = history_media
        self.pipe = pipe
        self.system_prompt = system_prompt
        self.seed = seed
        self.max_new_tokens = max_new_tokens
        # per-modality generation settings, kept as plain dicts so that they save as JSON
        self.settings = {str(Modality.parse(m).value): dataclasses.asdict(v) if dataclasses.is_dataclass(v) else dict(v)
                         for m, v in (settings or {}).items()}
        pipe.resolve_settings(self.settings)  # an unknown modality or field fails here, not on the first send
        self.turns: list[Turn] = []
        self.last_context_start = 0  # index into turns of the first turn the last prompt kept

    # ------------------------------------------------------------ talking
    def send(self, text: str = "", images: Sequence[Any] | Any = None, audios: Sequence[Any] | Any = None,
             videos: Sequence[Any] | Any = None, *, seed: int | None = None,
             max_new_tokens: int | None = None, on_text: Callable[[str], None] | None = None,
             on_step: Callable[[Modality, int, int], None] | None = None,
             **media_args: Sequence[Any] | Any) -> Turn:
        """Send one user turn (text with optional ``<image>``/``<audio>``/``<video>`` placeholders,
        and media; a registered modality's by its plural, ``depths=...``) and return the model's
        reply, which is also appended to the session.

        ``on_text(text)`` is called after each generated token with the reply so far, and
        ``on_step(modality, step, total)`` after each denoising step of a medium (see
        :meth:`AnyModalPipeline.__call__`). An exception a hook raises (or any other) leaves the
        session as it was: the turn is not added."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a string, got {type(text).__name__}")
        given = media_by_plural(dict(images=images, audios=audios, videos=videos, **media_args), "send()")
        media = {m: items for m, v in given.items() if v is not None and (items := _as_list(m, v))}
        if not text.strip() and not media:
            raise ValueError("nothing to send: give some text or media")
        self.pipe.processor.check_chars(text, self.pipe.context_length, "the message")
        for m in media:
            self.pipe.processor.check_takes(m)
        counts = {m: len(v) for m, v in media.items()}
        user = Turn("user", self.pipe.processor.place_media(text, counts), media)
        if seed is None and self.seed is not None:
            seed = self.seed + sum(1 for t in self.turns if t.role == "assistant")
        max_new = max_new_tokens or self.max_new_tokens or self.pipe.config.llm.max_new_tokens
        messages, start = self.context(user, max_new)
        out = self.pipe.generate([messages], max_new_tokens=max_new, settings=self.settings or None, seed=seed,
                                 progress=False, on_text=(lambda texts: on_text(texts[0])) if on_text else None,
                                 on_step=on_step)
        reply = Turn("assistant", out.text[0], {m: per_prompt[0] for m, per_prompt in out.media.items() if per_prompt[0]},
                     seed=seed, token_ids=list(out.token_ids[0]))
        self.turns += [user, reply]
        self.last_context_start = start
        return reply

    def context(self, new_turn: Turn | None = None, max_new_tokens: int | None = None) -> tuple[list[Message], int]:
        """The messages the next prompt is made of, after the context-length policy, and the index of
        the first kept turn."""
        turns = self.turns + ([new_turn] if new_turn is not None else [])
        max_new = max_new_tokens or self.max_new_tokens or self.pipe.config.llm.max_new_tokens
        limit = self.pipe.context_length
        system = [Message("system", self.system_prompt)] if self.system_prompt else []
        # candidate starts: the beginning of each exchange, oldest first
        starts = [i for i, t in enumerate(turns) if t.role == "user"] or [0]
        for start in starts:
            messages = system + [self._message(t) for t in turns[start:]]
            if limit is None or self._length(messages) + max_new <= limit:
                return messages, start
        raise ValueError(f"the message is too long for the model: {self._length(messages)} prompt tokens plus "
                         f"max_new_tokens={max_new} exceed its context of {limit} tokens, even with every earlier "
                         "turn left out")

    def _message(self, turn: Turn) -> Message:
        if turn.role == "user":
            return Message("user", turn.text, dict(turn.media))
        if self.history_media == "signal":
            return self._generated_message(turn)
        text, media = turn.text, {}
        for m, items in turn.media.items():
            if m in self.pipe.config.input_projectors:
                media[m] = list(items)
            else:  # the model cannot see this medium: drop its placeholder
                text = text.replace(m.spec.placeholder, "")
        return Message("assistant", " ".join(text.split()) if text != turn.text else text, media)

    def _generated_message(self, turn: Turn) -> Message:
        """An earlier reply as the model produced it: its own ids decoded with the signal tokens
        and end of turn kept, which is how stage 3 trains on a dialogue's earlier replies (a
        generated medium is its signal block, not an input). A reply without ids (sessions saved
        by hand) gets each medium's placeholder replaced by its signal block and the end-of-turn
        token the training data puts there."""
        proc = self.pipe.processor
        tok = proc.tokenizer
        if turn.token_ids:
            ids = [i for i in turn.token_ids if i != tok.pad_token_id]
            text = tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        else:
            text = turn.text
            for m in turn.media:
                if m in proc.signal_strings:
                    text = text.replace(m.spec.placeholder, " " + "".join(proc.signal_strings[m]))
            text = " ".join(text.split()) + proc.turn_end
        return Message("assistant", text, generated=True)

    def _length(self, messages: list[Message]) -> int:
        proc = self.pipe.processor
        rendered = [Message(m.role, proc.place_media(m.content, {k: len(v) for k, v in m.media.items()},
                                                     escape=not m.generated)) for m in messages]
        return proc.num_tokens(proc.format(rendered))

    # ------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write ``session.json`` and every medium (lossless: PNG, float WAV, PNG frames; files sent as
        paths are copied byte for byte). The directory is built beside its destination and swapped in,
        so an interrupted save leaves the previous one intact. An earlier saved session is replaced;
        any other non-empty directory only with ``overwrite=True``, and a file never."""
        directory = Path(directory)
        check_replaceable(directory, marker=SESSION_FILE, known=(SESSION_FILE, "media"), what="session directory",
                          overwrite=overwrite)
        atomic_dir(directory, self._write_into)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, pipe: AnyModalPipeline) -> "ChatSession":
        """Load a session saved by :meth:`save` to continue it with ``pipe``. A save that a crash cut
        mid-swap is recovered first (the previous save is put back)."""
        directory = Path(directory)
        recover_swapped_dir(directory)
        path = directory / SESSION_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{directory} is not a saved chat session (no {SESSION_FILE})")
        try:
            state = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from None
        _check_state(state, path)
        history = state.get("history_media", "input")  # sessions saved before it was recorded fed media back
        if history not in HISTORY_MEDIA:
            raise ValueError(f"{path}: 'history_media' must be one of {', '.join(HISTORY_MEDIA)}, got {history!r}")
        try:
            session = cls(pipe, system_prompt=state.get("system_prompt"), seed=state.get("seed"),
                          max_new_tokens=state.get("max_new_tokens"), settings=state.get("settings"),
                          history_media=history)
        except (TypeError, ValueError) as e:  # the settings: an unknown modality or field, a bad value
            raise ValueError(f"{path}: 'settings' is invalid: {e}") from None
        session.last_context_start = state.get("last_context_start", 0)
        for t in state["turns"]:
            media = {Modality.parse(m): [_load_medium(Modality.parse(m), e, directory) for e in entries]
                     for m, entries in t.get("media", {}).items()}
            session.turns.append(Turn(t["role"], t["text"], media, t.get("seed"), t.get("token_ids", [])))
        return session

    def _write_into(self, tmp: Path) -> None:
        (tmp / "media").mkdir()
        turns = []
        for n, turn in enumerate(self.turns):
            files: dict[str, list[str]] = {}
            for m, items in turn.media.items():
                files[m.value] = [_save_medium(m, item, tmp / "media" / f"{n:04d}_{turn.role}_{m.value}_{k}")
                                  for k, item in enumerate(items)]
            turns.append({"role": turn.role, "text": turn.text, "media": files, "seed": turn.seed,
                          "token_ids": turn.token_ids})
        state = {"format_version": FORMAT_VERSION, "system_prompt": self.system_prompt, "seed": self.seed,
                 "max_new_tokens": self.max_new_tokens, "settings": self.settings, "history_media": self.history_media,
                 "last_context_start": self.last_context_start, "turns": turns}
        with (tmp / SESSION_FILE).open("w") as f:
            json.dump(state, f, indent=2, ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())

    def __len__(self) -> int:
        return len(self.turns)


# ==================================================================== helpers
def _check_state(state: Any, path: Path) -> None:
    """Refuse a ``session.json`` that :meth:`ChatSession.save` could not have written, naming the
    first bad field, before anything is built from it (so that a bad seed fails here, not on the
    next send)."""
    from .inputs import check_max_new_tokens, check_seed

    def bad(where: str, what: str) -> ValueError:
        return ValueError(f"{path}: {where} {what}")

    def check(where: str, fn, value: Any) -> None:
        try:
            fn(value)
        except (TypeError, ValueError) as e:
            raise bad(where, f"is invalid: {e}") from None

    if not isinstance(state, dict):
        raise bad("the file", f"must hold a JSON object, got {type(state).__name__}")
    if state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported session format version {state.get('format_version')!r}")
    if not isinstance(state.get("system_prompt") or "", str):
        raise bad("'system_prompt'", "must be a string or null")
    check("'seed'", check_seed, state.get("seed"))
    check("'max_new_tokens'", check_max_new_tokens, state.get("max_new_tokens"))
    if not isinstance(state.get("settings") or {}, dict):
        raise bad("'settings'", "must be an object keyed by modality")
    turns = state.get("turns")
    if not isinstance(turns, list):
        raise bad("'turns'", "is missing" if turns is None else "must be a list of turns")
    start = state.get("last_context_start", 0)
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= len(turns):
        raise bad("'last_context_start'", f"must be an integer in [0, {len(turns)}], got {start!r}")
    for n, t in enumerate(turns):
        where = f"turns[{n}]"
        if not isinstance(t, dict):
            raise bad(where, f"must be an object, got {type(t).__name__}")
        for key in ("role", "text"):
            if key not in t:
                raise bad(where, f"has no {key!r}")
        if t["role"] not in ("user", "assistant"):
            raise bad(f"{where}.role", f"must be 'user' or 'assistant', got {t['role']!r}")
        if not isinstance(t["text"], str):
            raise bad(f"{where}.text", f"must be a string, got {type(t['text']).__name__}")
        check(f"{where}.seed", check_seed, t.get("seed"))
        ids = t.get("token_ids", [])
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                for i in ids):
            raise bad(f"{where}.token_ids", "must be a list of non-negative integers")
        media = t.get("media", {})
        if not isinstance(media, dict):
            raise bad(f"{where}.media", "must be an object keyed by modality")
        for m, entries in media.items():
            try:
                Modality.parse(m)
            except ValueError as e:
                raise bad(f"{where}.media", f"has an {e}") from None
            if not isinstance(entries, list):
                raise bad(f"{where}.media.{m}", "must be a list of files")
            for k, e in enumerate(entries):
                if not isinstance(e, dict) or not isinstance(e.get("file"), str) or e.get("as", "data") not in (
                        "path", "data"):
                    raise bad(f"{where}.media.{m}[{k}]", 'must be {"file": "media/...", "as": "path" or "data"}')


def _as_list(m: Modality, value: Any) -> list[Any]:
    """One medium of modality ``m`` (by its spec: an ``(array, rate)`` pair, a list of video frames)
    as a one-item list; a list or tuple of media as a list."""
    if isinstance(value, (list, tuple)) and not m.spec.is_medium(value):
        return list(value)
    return [value]


def _save_medium(m: Modality, item: Any, stem: Path) -> dict[str, str]:
    """Write one medium losslessly under ``stem`` (the spec's ``keep`` chooses the suffix).

    Returns ``{"file": path relative to the session, "as": "path" | "data"}``: a medium that was a
    file path is copied and given back as a path, anything else is given back decoded."""
    if isinstance(item, (str, os.PathLike)):
        src = Path(item)
        if not src.is_file():
            raise MediaError(f"cannot save the session: {m.value} file {src} no longer exists")
        dst = stem.with_name(stem.name + src.suffix.lower())
        shutil.copyfile(src, dst)
        return {"file": f"media/{dst.name}", "as": "path"}
    if m.spec.keep is None:
        raise MediaError(f"cannot save the session: {m.value} media given as data cannot be kept (its ModalitySpec "
                         "has no keep/restore); send them as files")
    return {"file": f"media/{m.spec.keep(item, stem).name}", "as": "data"}


def _load_medium(m: Modality, entry: Any, directory: Path) -> Any:
    """One medium of a saved session: a file inside the session directory (by name and after links:
    an absolute path, ``..`` or a link elsewhere is refused), never a file the session names elsewhere."""
    from .loading import confined

    where = f"{directory / SESSION_FILE}: {m.value} medium"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected {{\"file\": ..., \"as\": ...}}, got {type(entry).__name__}")
    path = confined(directory, entry.get("file"), f"{where} file", "session directory")
    if not path.exists():
        raise FileNotFoundError(f"session medium missing: {path}")
    if not path.is_file():
        raise ValueError(f"{where} file {entry.get('file')!r} is not a regular file")
    if entry.get("as") == "path":  # a copied input file: decoded by the encoder exactly as the original was
        return str(path)
    if m.spec.restore is None:
        raise ValueError(f"cannot read session medium {path}: modality {m.value} has no restore")
    try:
        return m.spec.restore(path)
    except (ValueError, OSError) as e:  # PIL's UnidentifiedImageError, soundfile's errors
        raise ValueError(f"cannot read session medium {path}: not a file that ChatSession.save writes ({e})") from None
