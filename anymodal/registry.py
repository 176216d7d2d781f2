"""Plain dict registries: component types are strings in config, resolved here."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A named mapping from a config string to a class or factory.

    ``get`` raises a ``ValueError`` that lists the valid keys, so a typo in a YAML file
    tells the user what they could have written.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        def add(o: T) -> T:
            if name in self._entries and self._entries[name] is not o:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = o
            return o

        return add(obj) if obj is not None else add

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(
                f"unknown {self.kind} {name!r}; registered: {', '.join(sorted(self._entries)) or '(none)'}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries


ENCODERS: Registry = Registry("encoder type")
INPUT_PROJECTORS: Registry = Registry("input projector type")
OUTPUT_PROJECTORS: Registry = Registry("output projector type")
GENERATORS: Registry = Registry("generator type")


def register_encoder(name: str):
    return ENCODERS.register(name)


def register_input_projector(name: str):
    return INPUT_PROJECTORS.register(name)


def register_output_projector(name: str):
    return OUTPUT_PROJECTORS.register(name)


def register_generator(name: str):
    return GENERATORS.register(name)


def list_encoders() -> list[str]:
    _load_builtin()
    return ENCODERS.names()


def list_input_projectors() -> list[str]:
    _load_builtin()
    return INPUT_PROJECTORS.names()


def list_output_projectors() -> list[str]:
    _load_builtin()
    return OUTPUT_PROJECTORS.names()


def list_generators() -> list[str]:
    _load_builtin()
    return GENERATORS.names()


def _load_builtin() -> None:
    """Import the modules whose import registers the built-in components."""
    import anymodal.encoders  # noqa: F401
    import anymodal.generators  # noqa: F401
    import anymodal.projectors  # noqa: F401
