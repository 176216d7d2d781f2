"""The processor owns the tokenizer, the signal-token and placeholder strings and ids, and
prompt formatting. It expands each media placeholder into the positions its features fill.

Prompt text marks where a medium goes with its placeholder: ``"What is in <image>?"``.
The model's output marks where it generated a medium the same way.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from .config import PromptOptions
from .modality import Modality, media_modalities
from .utils import atomic_write_text

if TYPE_CHECKING:
    from .model import TokenIds

# Every processor's vocabulary holds these placeholders (saved processors and shipped models have
# them); another modality's placeholder is added when the model takes that modality as input.
_ALWAYS_PLACED = (Modality.IMAGE, Modality.AUDIO, Modality.VIDEO)
PROCESSOR_CONFIG = "processor_config.json"
INSTRUCTION_TOKENIZER = "instruction_tokenizer"

# Used when the tokenizer has no chat template (tiny and locally trained tokenizers).
DEFAULT_TEMPLATE = {"system": "{content}\n", "user": "### Human: {content}\n", "assistant": "### Assistant: {content}\n",
                    "generation": "### Assistant:"}


def signal_token_pattern() -> str:
    """A regex matching the default-named signal tokens of every registered modality and any index,
    including ones a model does not use (typed text must never produce them)."""
    return r"<(?:%s)_\d+>" % "|".join(re.escape(m.spec.signal_prefix) for m in media_modalities())


def signal_token_strings(modality: Modality, count: int, name: str | None = None) -> list[str]:
    """The signal tokens of ``modality``: ``name`` formatted with ``i`` (default ``<img_{i}>``, from
    its spec's ``signal_prefix``)."""
    name = name or f"<{Modality.parse(modality).spec.signal_prefix}_{{i}}>"
    return [name.format(i=i) for i in range(count)]


@dataclass
class Message:
    """One turn: ``role`` is system, user or assistant; ``content`` may hold placeholders.

    ``generated``: an assistant turn rendered from the ids the model itself produced (its signal
    tokens kept, as stage-3 training renders replies), so its signal-token strings are not escaped
    the way typed text's are. Only a session's own history sets it."""

    role: str
    content: str
    media: dict[Modality, list[Any]] = field(default_factory=dict)
    generated: bool = False

    def __post_init__(self) -> None:
        if self.role not in ("system", "user", "assistant"):
            raise ValueError(f"message role must be 'system', 'user' or 'assistant', got {self.role!r}")


@dataclass
class ModelInputs:
    """A batch of conversations made ready for the model by :meth:`AnyModalProcessor.prepare`.

    ``media[m]`` holds every medium of modality ``m`` in the batch, in reading order, preprocessed
    by its encoder into one tensor; ``sources[m]`` the media as given (for error messages);
    ``instructions[m]`` the token ids of the text each medium came with, for projectors that read
    the prompt (InstructBLIP's Q-Former), when the processor has an instruction tokenizer.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    media: dict[Modality, torch.Tensor] = field(default_factory=dict)
    sources: dict[Modality, list[Any]] = field(default_factory=dict)
    instructions: dict[Modality, dict[str, torch.Tensor]] = field(default_factory=dict)


Preprocessor = Callable[[Sequence[Any]], torch.Tensor]


class AnyModalProcessor:
    """Everything between a conversation and the model's inputs: the tokenizer, the strings and ids
    of placeholders and signal tokens, prompt formatting, and each input modality's preprocessing
    (its encoder's, as LLaVA's processor holds its image processor).

    ``media_tokens[m]`` is how many positions one input medium of modality ``m`` fills (its
    input projector's ``num_tokens``); ``signal_tokens[m]`` is the length of the output block;
    ``preprocessors[m]`` turns a list of media into one batched tensor.
    """

    def __init__(self, tokenizer, signal_tokens: dict[Modality, int], media_tokens: dict[Modality, int],
                 system_prompt: str | None = None, max_length: int | None = None, add_special_tokens: bool = False,
                 media_before_bos: bool = False, instruction_tokenizer=None,
                 prompt_options: PromptOptions | dict | None = None,
                 preprocessors: dict[Modality, Preprocessor] | None = None):
        self.tokenizer = tokenizer
        self.preprocessors = {Modality.parse(m): f for m, f in (preprocessors or {}).items()}
        # Released systems (anymodal.hf_systems.PromptFormat): the tokenizer adds its own BOS, and
        # BLIP-2-style prompts put the leading media positions before it.
        self.add_special_tokens = add_special_tokens
        self.media_before_bos = media_before_bos
        self.instruction_tokenizer = instruction_tokenizer  # InstructBLIP's Q-Former reads the prompt too
        self.signal_tokens = {Modality.parse(k): int(v) for k, v in signal_tokens.items()}
        self.media_tokens = {Modality.parse(k): int(v) for k, v in media_tokens.items()}
        self.system_prompt = system_prompt
        self.max_length = max_length
        if not isinstance(prompt_options, PromptOptions):
            from .config import _build

            prompt_options = _build(PromptOptions, prompt_options or {}, "prompt_options")
        self.prompt_options = prompt_options
        self.signal_strings = {m: signal_token_strings(m, n, prompt_options.signal_token_names.get(m))
                               for m, n in self.signal_tokens.items()}
        self.placeholders = {m: m.spec.placeholder for m in media_modalities()
                             if m in _ALWAYS_PLACED or m in self.media_tokens}
        # Tokens already in the vocabulary (a converted checkpoint's) keep their ids; new ones go last.
        added = list(self.placeholders.values())
        for pair in prompt_options.media_wrap.values():
            added += [t for t in pair if t not in added]
        for m in self.signal_tokens:
            added += self.signal_strings[m]
        vocab = tokenizer.get_vocab()  # once: a slow tokenizer builds it token by token
        new = [t for t in added if t not in vocab]
        if new:
            tokenizer.add_special_tokens({"additional_special_tokens": new}, replace_extra_special_tokens=False)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        tokenizer.padding_side = "left"  # decoder-only batched generation
        self.placeholder_ids = {m: tokenizer.convert_tokens_to_ids(p) for m, p in self.placeholders.items()}
        self.signal_ids = {m: tokenizer.convert_tokens_to_ids(self.signal_strings[m]) for m in self.signal_tokens}
        self.wrap_ids = {m: tokenizer.convert_tokens_to_ids(pair) for m, pair in prompt_options.media_wrap.items()}
        self._signal_lookup = {i: (m, k) for m, ids in self.signal_ids.items() for k, i in enumerate(ids)}

    def token_ids(self) -> TokenIds:
        """The placeholder and signal-token ids and the vocabulary size: all the model needs."""
        from .model import TokenIds

        return TokenIds(dict(self.placeholder_ids),
                        {m: list(ids) for m, ids in self.signal_ids.items()}, len(self.tokenizer))

    @property
    def new_token_ids(self) -> list[int]:
        """Ids of every token the processor added (placeholders and signal tokens)."""
        return sorted(set(self.placeholder_ids.values()) | set(self._signal_lookup))

    # ------------------------------------------------------------ formatting
    @property
    def turn_end(self) -> str:
        """What closes an assistant turn in training text: EOS, unless a chat template marks the end of
        an answer itself (generation stops on EOS, so the model must learn to emit it)."""
        tok = self.tokenizer
        return "" if getattr(tok, "chat_template", None) else (tok.eos_token or "")

    def format(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """Render a conversation to text, with the tokenizer's chat template if it has one."""
        msgs = list(messages)
        if self.system_prompt and not (msgs and msgs[0].role == "system"):
            msgs.insert(0, Message("system", self.system_prompt))
        template = self.prompt_options.template
        if template is None and getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in msgs],
                                                      tokenize=False, add_generation_prompt=add_generation_prompt)
        template = template or DEFAULT_TEMPLATE
        text = "".join(template[m.role].format(content=m.content) for m in msgs)
        return text + (template["generation"] if add_generation_prompt else "")

    def count_placeholders(self, text: str) -> dict[Modality, int]:
        return {m: text.count(p) for m, p in self.placeholders.items()}

    def expand(self, text: str) -> str:
        """Repeat each placeholder as many times as its medium has positions (inside its wrapping tokens)."""
        for m, p in self.placeholders.items():
            n = self.media_tokens.get(m, 1)
            wrap = self.prompt_options.media_wrap.get(m)
            if n > 1 or wrap:
                open_, close = wrap or ("", "")
                text = text.replace(p, open_ + p * n + close)
        return text

    def _segment_ids(self, text: str) -> list[int]:
        """``bos_per_segment``: BOS + each text segment tokenised alone; media as their tokens."""
        tok = self.tokenizer
        if tok.bos_token_id is None:
            raise ValueError("prompt format bos_per_segment needs a tokenizer with a BOS token")
        pattern = "(" + self._placeholder_pattern() + ")"
        ids: list[int] = []
        parts = re.split(pattern, text)
        for k, part in enumerate(parts):
            if k % 2:  # a placeholder
                m = Modality.parse(part[1:-1])
                wrap = self.wrap_ids.get(m, [])
                ids += wrap[:1] + [self.placeholder_ids[m]] * self.media_tokens.get(m, 1) + wrap[1:]
                continue
            if k > 0 and part.startswith(" "):  # one space either side of a medium belongs to it
                part = part[1:]
            if k < len(parts) - 1 and part.endswith(" "):
                part = part[:-1]
            if part:
                ids += [tok.bos_token_id] + tok(part, add_special_tokens=False)["input_ids"]
        return ids

    def escape(self, text: str) -> str:
        """Neutralise the added token strings that typed text must never produce: signal tokens
        (``<img_0>``, or a converted system's names) and media wrappers. A zero-width space after
        the first character keeps the text readable but no longer matches the added token. Media
        placeholders are not escaped: they mark where given media go, and :meth:`place_media`
        checks their number against the media."""
        return self._escape_pattern().sub(lambda mt: mt.group(0)[0] + "\u200b" + mt.group(0)[1:], text)

    def _escape_pattern(self) -> re.Pattern:
        cached = self.__dict__.get("_escape_re")
        if cached is None:
            strings = {s for group in self.signal_strings.values() for s in group}
            strings |= {t for pair in self.prompt_options.media_wrap.values() for t in pair}
            strings -= set(self.placeholders.values())
            alternatives = [re.escape(s) for s in sorted(strings, key=len, reverse=True)] + [signal_token_pattern()]
            cached = self.__dict__["_escape_re"] = re.compile("|".join(alternatives))
        return cached

    def place_media(self, text: str, counts: dict[Modality, int], escape: bool = True) -> str:
        """Check placeholders against the media given; prepend them when the text has none.
        Signal-token strings in the text are escaped (see :meth:`escape`) unless ``escape`` is off
        (the model's own reply, :attr:`Message.generated`)."""
        text = self.escape(text) if escape else text
        found = self.count_placeholders(text)
        prefix = ""
        for m, n in counts.items():
            if n and m not in self.placeholders:
                self.check_takes(m)
        for m, p in self.placeholders.items():
            n = counts.get(m, 0)
            if found[m] == 0 and n:
                prefix += p * n
            elif found[m] != n:
                raise ValueError(f"the prompt has {found[m]} {p} placeholder(s) but {n} {m.value}(s) "
                                 f"were given; give one {m.value} per placeholder, or no placeholders at all")
        if not prefix:
            return text
        if self.prompt_options.bos_per_segment:
            # NExT-GPT's prompt builder (demo_app.py): each medium then a space, then " " + the text; its
            # split on " <" and "> " takes one space either side of a medium (as _segment_ids does), so
            # the text keeps one leading space
            return "".join(p + " " for p in self._placeholders_in(prefix)) + " " + text
        return f"{prefix}\n{text}"

    # ------------------------------------------------------------ tokenising
    def max_chars(self, tokens: int) -> int:
        """The most characters that ``tokens`` tokens can spell: a bound checked before tokenising,
        so that a prompt of megabytes is refused at once instead of after seconds of tokenising.
        No token spells more characters than its vocabulary entry (byte-level vocabularies spell one
        byte per character, and a character is at least one byte); a word-piece unknown token may
        stand for a whole word, so the factor is at least 128 characters per token."""
        longest = self.__dict__.get("_longest_token")
        if longest is None:
            longest = self.__dict__["_longest_token"] = max(map(len, self.tokenizer.get_vocab()), default=1)
        return tokens * max(longest, 128)

    def check_chars(self, text: str, tokens: int | None, where: str = "the prompt") -> None:
        """Refuse ``text`` when it has more characters than ``tokens`` tokens can spell (``None``: no limit)."""
        if tokens is not None and len(text) > self.max_chars(tokens):
            raise ValueError(f"{where} is too long: {len(text)} characters, and the model's context of {tokens} "
                             f"tokens holds at most {self.max_chars(tokens)} characters; shorten it")

    def num_tokens(self, text: str) -> int:
        """Length of a formatted text in tokens, each placeholder counted as its medium's positions."""
        if self.prompt_options.bos_per_segment:
            return len(self._segment_ids(text))
        if self.add_special_tokens or self.media_before_bos:
            return len(self._encode(text))
        return len(self.tokenizer(self.expand(text), add_special_tokens=False)["input_ids"])

    def _encode(self, text: str) -> list[int]:
        """Token ids of one formatted text, laid out as the released system's own processor does."""
        lead: list[int] = []
        if self.media_before_bos:
            found = re.match("(?:" + self._placeholder_pattern() + r")+\s*", text)
            if found:
                head, text = found.group(0).strip(), text[found.end():]
                lead = self.tokenizer(self.expand(head), add_special_tokens=False)["input_ids"]
        return lead + self.tokenizer(self.expand(text), add_special_tokens=self.add_special_tokens)["input_ids"]

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenise formatted texts (placeholders already placed) with left padding."""
        if self.prompt_options.bos_per_segment or self.add_special_tokens or self.media_before_bos:
            encode = self._segment_ids if self.prompt_options.bos_per_segment else self._encode
            rows = [encode(t) for t in texts]
            width = max(len(r) for r in rows)
            pad = self.tokenizer.pad_token_id
            enc = {"input_ids": torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long),
                   "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows],
                                                  dtype=torch.long)}
        else:
            expanded = [self.expand(t) for t in texts]
            enc = self.tokenizer(expanded, return_tensors="pt", padding=True, add_special_tokens=False)
        if self.max_length is not None and enc["input_ids"].shape[1] > self.max_length:
            raise ValueError(f"the prompt is {enc['input_ids'].shape[1]} tokens long (media positions included); "
                             f"the model's limit is {self.max_length}")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def check_takes(self, modality: Modality | str) -> None:
        """Raise ``ValueError`` unless the model takes ``modality`` as input (it has an input projector)."""
        m = Modality.parse(modality)
        if m not in self.media_tokens:
            raise ValueError(f"this model takes no {m.value} input (it takes "
                             f"{', '.join(x.value for x in self.media_tokens) or 'text only'})")

    def prepare(self, conversations: Sequence[Sequence[Message]]) -> ModelInputs:
        """Check and lay out a batch of conversations: each message's text and media are checked,
        placeholders placed (:meth:`place_media`), each conversation rendered (:meth:`format`), the
        batch tokenised left-padded (:meth:`__call__`) and the media preprocessed, in reading order."""
        from .inputs import check_medium, check_text

        texts: list[str] = []
        sources: dict[Modality, list[Any]] = {}
        context: dict[Modality, list[str]] = {}  # the text each medium came with
        for conv in conversations:
            rendered = []
            for msg in conv:
                check_text(msg.content, f"{msg.role} message")
                media = {Modality.parse(m): list(items) for m, items in msg.media.items() if items}
                for m, items in media.items():
                    for item in items:
                        check_medium(m, item)
                    self.check_takes(m)
                if msg.generated and msg.role != "assistant":
                    raise ValueError(f"only an assistant message can be marked generated, not a {msg.role} message")
                rendered.append(Message(msg.role, self.place_media(msg.content, {m: len(v) for m, v in media.items()},
                                                                   escape=not msg.generated)))
                for m, items in media.items():
                    sources.setdefault(m, []).extend(items)
                    context.setdefault(m, []).extend([msg.content] * len(items))
            texts.append(self.format(rendered))
        sources = {m: sources[m] for m in media_modalities() if m in sources}  # one order for every batch
        batch = self(texts)
        inputs = ModelInputs(batch["input_ids"], batch["attention_mask"], sources=sources)
        for m, items in sources.items():
            if m not in self.preprocessors:
                raise ValueError(f"the processor has no preprocessing for {m.value} (no encoder serves it)")
            inputs.media[m] = self.preprocessors[m](items)
            if self.instruction_tokenizer is not None:
                inputs.instructions[m] = self.instruction_inputs(context[m])
        return inputs

    def instruction_inputs(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The instruction-reading projector's input: each text (placeholders removed) through its own tokenizer."""
        if self.instruction_tokenizer is None:
            raise ValueError("this processor has no instruction tokenizer (only instruction-aware projectors use one)")
        clean = [self.strip_placeholders(t) for t in texts]
        tok = self.instruction_tokenizer
        limit = min(getattr(tok, "model_max_length", 512) or 512, 512)
        enc = tok(clean, return_tensors="pt", padding=True, truncation=True, max_length=limit)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def strip_placeholders(self, text: str) -> str:
        for p in self.placeholders.values():
            text = text.replace(p, "")
        return text.strip()

    def _placeholders_in(self, text: str) -> list[str]:
        return re.findall(self._placeholder_pattern(), text)

    def _placeholder_pattern(self) -> str:
        return "|".join(re.escape(p) for p in self.placeholders.values())

    # ------------------------------------------------------------ decoding
    def split_output(self, ids: Sequence[int]) -> tuple[str, list[tuple[Modality, int]]]:
        """Decode generated ids to text with each signal block replaced by its placeholder.

        Returns the text and, per block, its modality and start index in ``ids``.
        """
        pieces: list[str] = []
        spans: list[tuple[Modality, int]] = []
        run: list[int] = []
        ids = list(ids)
        i = 0
        while i < len(ids):
            hit = self._signal_lookup.get(ids[i])
            if hit is not None and hit[1] == 0:
                m = hit[0]
                n = self.signal_tokens[m]
                if ids[i:i + n] == self.signal_ids[m]:
                    pieces.append(self.tokenizer.decode(run, skip_special_tokens=True))
                    run = []
                    pieces.append(m.spec.placeholder)
                    spans.append((m, i))
                    i += n
                    continue
            run.append(ids[i])
            i += 1
        pieces.append(self.tokenizer.decode(run, skip_special_tokens=True))
        text = "".join(pieces)
        for stop in self.prompt_options.stop_strings:
            if stop in text:
                text = text[:text.index(stop)]
        return re.sub(r"[ \t]+\n", "\n", text).strip(), spans

    def stop_length(self, ids: Sequence[int]) -> int | None:
        """Number of leading ``ids`` up to and including the first stop string, or None if none occurs."""
        stops = self.prompt_options.stop_strings
        if not stops:
            return None
        for n in range(1, len(ids) + 1):
            text = self.tokenizer.decode(ids[:n], skip_special_tokens=False)
            if any(s in text for s in stops):
                return n
        return None

    # ------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(directory)
        meta = {"signal_tokens": {m.value: n for m, n in self.signal_tokens.items()},
                "media_tokens": {m.value: n for m, n in self.media_tokens.items()},
                "system_prompt": self.system_prompt, "max_length": self.max_length,
                "add_special_tokens": self.add_special_tokens, "media_before_bos": self.media_before_bos}
        if self.prompt_options != PromptOptions():
            from .config import _plain

            meta["prompt_options"] = _plain(dataclasses.asdict(self.prompt_options))
        if self.instruction_tokenizer is not None:
            self.instruction_tokenizer.save_pretrained(directory / INSTRUCTION_TOKENIZER)
        atomic_write_text(directory / PROCESSOR_CONFIG, json.dumps(meta, indent=2))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike,
                        preprocessors: dict[Modality, Preprocessor] | None = None) -> "AnyModalProcessor":
        from .loading import library_errors, read_json

        directory = Path(directory)
        meta = read_json(directory / PROCESSOR_CONFIG, "processor")
        with library_errors(f"cannot load the processor from {directory}", directory):
            return cls._from_saved(directory, meta, preprocessors)

    @classmethod
    def _from_saved(cls, directory: Path, meta: dict[str, Any], preprocessors: Any) -> "AnyModalProcessor":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(directory)
        inst = directory / INSTRUCTION_TOKENIZER
        return cls(tok, meta["signal_tokens"], meta["media_tokens"], meta.get("system_prompt"), meta.get("max_length"),
                   add_special_tokens=meta.get("add_special_tokens", False),
                   media_before_bos=meta.get("media_before_bos", False),
                   instruction_tokenizer=AutoTokenizer.from_pretrained(inst) if inst.is_dir() else None,
                   prompt_options=meta.get("prompt_options"), preprocessors=preprocessors)
