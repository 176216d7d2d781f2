"""The modalities anymodal knows about, one :class:`ModalitySpec` each.

A modality is a key (:class:`Modality`, a string such as ``"image"``) plus everything the library
needs to handle its media: the placeholder that marks an input medium in a prompt (``<image>``),
the prefix of its signal tokens (``<img_0>``), the output field and keyword argument that carry
its media (``images``), the file a generated medium is written to (``.png``), its settings class,
and how one medium is recognised, checked and saved. Every part of the library reads these specs;
adding a modality is one :func:`register_modality` call plus an encoder and a generator for it
(docs/architecture.md, "How to add a modality").

The three built-in media modalities are registered in :mod:`anymodal.builtin`, from the loaders
in :mod:`anymodal.media`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

_KEYS: dict[str, "Modality"] = {}
_SPECS: dict["Modality", "ModalitySpec"] = {}
_NAME = re.compile(r"[a-z][a-z0-9_]*")


class _ModalityType(type):
    def __iter__(cls) -> Iterator["Modality"]:
        return iter(list(_KEYS.values()))

    def __len__(cls) -> int:
        return len(_KEYS)


class Modality(str, metaclass=_ModalityType):
    """A modality's key: a string (``Modality.IMAGE == "image"``), one interned object per name, so
    ``m is Modality.IMAGE`` holds for every ``m`` made from ``"image"``. ``Modality("smell")`` raises
    ``ValueError`` until a modality of that name is registered."""

    __slots__ = ()
    TEXT: "Modality"
    IMAGE: "Modality"
    AUDIO: "Modality"
    VIDEO: "Modality"

    def __new__(cls, value: "Modality | str") -> "Modality":
        try:
            return _KEYS[str.__str__(value) if isinstance(value, str) else value]
        except (KeyError, TypeError):
            raise ValueError(f"{value!r} is not a registered modality") from None

    @classmethod
    def _declare(cls, name: str) -> "Modality":
        if name not in _KEYS:
            key = str.__new__(cls, name)
            _KEYS[name] = key
            setattr(cls, name.upper(), key)
        return _KEYS[name]

    @classmethod
    def parse(cls, value: "Modality | str") -> "Modality":
        """Turn a string like ``"image"`` into a :class:`Modality`, raising a clear error otherwise."""
        if isinstance(value, Modality):
            return value
        name = str(value).lower()
        if name not in _KEYS:  # a plugin (entry-point group anymodal.components) may register it on load
            from .registry import load_plugins

            load_plugins()
        try:
            return cls(name)
        except ValueError:
            raise ValueError(f"unknown modality {value!r}; expected one of: {', '.join(_KEYS)}") from None

    @property
    def value(self) -> str:
        return str.__str__(self)

    @property
    def name(self) -> str:
        return self.value.upper()

    @property
    def spec(self) -> "ModalitySpec":
        """This modality's spec (text has none: it is not a medium)."""
        try:
            return _SPECS[self]
        except KeyError:
            raise ValueError(f"{self.value} is not a media modality; media modalities: "
                             f"{', '.join(media_modalities())}") from None

    def __str__(self) -> str:
        return self.value

    def __repr__(self) -> str:
        return f"Modality.{self.name}"

    def __reduce__(self):  # copies and pickles resolve to the interned key
        return (Modality, (self.value,))

    def __deepcopy__(self, memo: dict) -> "Modality":
        return self

    def __copy__(self) -> "Modality":
        return self


@dataclass(frozen=True)
class ModalitySpec:
    """Everything the library needs to know about one media modality.

    ``name`` is the key in configs and settings (``"image"``); ``plural`` names the output field,
    the keyword argument of ``AnyModalPipeline.__call__`` and ``ChatSession.send`` and the batch-row
    field (``"images"``); ``signal_prefix`` names the default signal tokens (``<img_0>``);
    ``suffix`` is the file type a generated medium is written as (``".png"``).

    The callables: ``is_medium(x)`` says whether ``x`` is one medium (rather than a list of them);
    ``check(x)`` raises :class:`anymodal.media.MediaError` for a medium that cannot be used (called
    before any model runs; may do nothing); ``save(medium, path)`` writes one generated medium and
    returns the path. ``accepts`` describes the accepted inputs, for error messages.
    ``settings_class`` is the dataclass of its generation settings. ``suffixes`` lists other file
    types ``save`` writes, chosen by the path's suffix (video: ``.mp4`` besides ``.gif``);
    ``save_options`` names the writing options ``save`` takes as keywords (video: ``fps``).

    ``keep(medium, stem)`` and ``restore(path)`` let a saved chat session hold media given as data
    (not as file paths) losslessly: ``keep`` writes ``stem`` plus a suffix of its choice (or a folder)
    and returns the path, ``restore`` reads it back. Without them a session saves only the media of
    this modality that were given as files.
    """

    name: str
    plural: str
    signal_prefix: str
    suffix: str
    settings_class: type
    accepts: str
    is_medium: Callable[[Any], bool]
    save: Callable[[Any, Path], Path]
    check: Callable[[Any], None] = lambda item: None
    default_signal_tokens: int = 4
    suffixes: tuple[str, ...] = ()
    save_options: tuple[str, ...] = ()
    keep: Callable[[Any, Path], Path] | None = None
    restore: Callable[[Path], Any] | None = None
    # lower-case words or phrases by which a request asks for this medium ("draw", "play"): a reply to
    # such a request (with no medium of this kind attached) that holds none gets a warning
    request_words: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for field_name in ("name", "plural", "signal_prefix"):
            value = getattr(self, field_name)
            if not isinstance(value, str) or not _NAME.fullmatch(value):
                raise ValueError(f"ModalitySpec.{field_name} must be a lower-case identifier (letters, digits, _), "
                                 f"got {value!r}")
        if self.name == self.plural:
            raise ValueError(f"ModalitySpec {self.name!r}: plural must differ from name")
        for suffix in (self.suffix, *self.suffixes):
            if not (isinstance(suffix, str) and re.fullmatch(r"\.[a-z0-9]{1,8}", suffix)):
                raise ValueError(f"ModalitySpec {self.name!r}: a file suffix is '.' and 1 to 8 lower-case letters "
                                 f"or digits, got {suffix!r}")

    @property
    def key(self) -> Modality:
        return Modality(self.name)

    @property
    def file_suffixes(self) -> tuple[str, ...]:
        """Every file type ``save`` writes, the default first."""
        return (self.suffix, *[s for s in self.suffixes if s != self.suffix])

    @property
    def placeholder(self) -> str:
        """The string that marks one input medium in a prompt and one generated medium in the output."""
        return f"<{self.name}>"


def register_modality(spec: ModalitySpec, *, replace: bool = False) -> Modality:
    """Register a media modality; returns its key (also set as ``Modality.<NAME>``).

    Raises if the name, plural or signal prefix is taken by another modality, unless ``replace``
    (for the same name)."""
    if not isinstance(spec, ModalitySpec):
        raise TypeError(f"register_modality takes a ModalitySpec, got {type(spec).__name__}")
    if spec.name == "text":
        raise ValueError("'text' is the LLM's own modality and cannot be registered as a medium")
    for other in _SPECS.values():
        if other.name == spec.name:
            if replace:
                continue
            raise ValueError(f"modality {spec.name!r} is already registered; pass replace=True to redefine it")
        for field_name in ("name", "plural", "signal_prefix"):
            if getattr(spec, field_name) in (other.plural, other.signal_prefix, other.name):
                raise ValueError(f"modality {spec.name!r}: {field_name} {getattr(spec, field_name)!r} is already "
                                 f"used by modality {other.name!r}")
    key = Modality._declare(spec.name)
    _SPECS[key] = spec
    return key


def unregister_modality(name: "Modality | str") -> None:
    """Remove a registered media modality (for tests and plugins that add one for a while)."""
    key = Modality.parse(name)
    if key in (Modality.IMAGE, Modality.AUDIO, Modality.VIDEO):
        raise ValueError(f"the built-in modality {key.value!r} cannot be removed")
    _SPECS.pop(key, None)
    _KEYS.pop(key.value, None)
    if getattr(Modality, key.name, None) is key:
        delattr(Modality, key.name)


def media_modalities() -> tuple[Modality, ...]:
    """Every registered media modality, in registration order (the built-ins first)."""
    return tuple(_SPECS)


def by_plural(plural: str) -> Modality | None:
    """The modality whose plural (``"images"``) is ``plural``, or ``None``."""
    return next((m for m, s in _SPECS.items() if s.plural == plural), None)


class MediaFields:
    """``images``, ``audios``, ``videos``, and the plural of any registered modality (``depths``), as
    views of the object's ``media`` mapping (by modality); a modality it lacks reads as ``[]``."""

    media: dict[Modality, Any]

    @property
    def images(self) -> Any:
        return self.media.get(Modality.IMAGE, [])

    @property
    def audios(self) -> Any:
        return self.media.get(Modality.AUDIO, [])

    @property
    def videos(self) -> Any:
        return self.media.get(Modality.VIDEO, [])

    def __getattr__(self, name: str) -> Any:  # only reached for names the class does not define
        m = by_plural(name) if not name.startswith("_") else None
        if m is None or "media" not in self.__dict__:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return self.media.get(m, [])


def media_by_plural(arguments: dict[str, Any], where: str) -> dict[Modality, Any]:
    """Media keyword arguments (``images=...``, ``depths=...``) keyed by modality; an argument that is
    no modality's plural is a ``TypeError`` naming ``where`` and the plurals allowed."""
    media = {}
    for plural, value in arguments.items():
        m = by_plural(plural)
        if m is None:
            raise TypeError(f"{where} got an unexpected keyword argument {plural!r}; media are given as "
                            f"{', '.join(x.spec.plural + '=...' for x in media_modalities())}")
        media[m] = value
    return media


# The keys of text and the built-in media exist from import, for module-level use; the media's
# specs are registered in anymodal.builtin.
Modality._declare("text")
for _name in ("image", "audio", "video"):
    Modality._declare(_name)
