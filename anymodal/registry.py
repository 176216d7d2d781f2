"""Plain dict registries: component types are strings in config, resolved here.

Third-party packages add component types through the entry-point group ``anymodal.components``
(see :func:`load_plugins`): they are imported the first time a lookup misses, so a plugin's types
work in the CLI and when a saved pipeline is reloaded, with no import in the user's code.
"""

from __future__ import annotations

import importlib
import logging
import types
import warnings
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")

ENTRY_POINT_GROUP = "anymodal.components"
logger = logging.getLogger(__name__)


class Registry(Generic[T]):
    """A named mapping from a config string to a class or factory.

    ``get`` raises a ``ValueError`` that lists the valid keys, so a typo in a YAML file
    tells the user what they could have written.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._modules: dict[str, str] = {}  # declared built-in name -> the module whose import registers it

    def declare(self, name: str, module: str) -> None:
        """Say that importing ``module`` registers ``name``; the module is imported on the first
        ``get(name)``. The built-ins are declared this way (:mod:`anymodal.builtin`), so that knowing
        their names costs no import of torch, transformers or diffusers."""
        self._modules[name] = module

    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        if not isinstance(name, str) or not name.strip() or name != name.strip():
            # a None or empty name once made every later listing of this registry fail (found by fuzzing plugins)
            raise ValueError(f"a {self.kind} name must be a non-empty string without surrounding spaces, got {name!r}")

        def add(o: T) -> T:
            if name in self._entries and self._entries[name] is not o:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            builtin = self._modules.get(name)
            if builtin is not None and name not in self._entries and getattr(o, "__module__", None) != builtin:
                # a built-in not imported yet: taking its name would shadow it, and break it once imported
                raise ValueError(f"{self.kind} {name!r} is a built-in type (registered by {builtin}); choose another name")
            self._entries[name] = o
            return o

        return add(obj) if obj is not None else add

    def get(self, name: str) -> T:
        if name not in self._entries and name in self._modules:
            importlib.import_module(self._modules[name])
        if name not in self._entries:
            # A miss may be a type that a plugin registers on import (built-ins are registered by
            # anymodal.builtin, which the package imports).
            load_plugins()
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        msg = f"unknown {self.kind} {name!r}; registered: {', '.join(self.names()) or '(none)'}"
        if _PLUGIN_ERRORS:
            msg += "; plugins that failed to load: " + "; ".join(f"{k}: {v}" for k, v in _PLUGIN_ERRORS.items())
        else:
            msg += f" (third-party types register through the {ENTRY_POINT_GROUP!r} entry-point group)"
        return msg

    def names(self) -> list[str]:
        return sorted({*self._entries, *self._modules})

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._modules


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
    _load_all()
    return ENCODERS.names()


def list_input_projectors() -> list[str]:
    _load_all()
    return INPUT_PROJECTORS.names()


def list_output_projectors() -> list[str]:
    _load_all()
    return OUTPUT_PROJECTORS.names()


def list_generators() -> list[str]:
    _load_all()
    return GENERATORS.names()


def _load_all() -> None:
    load_plugins()


# entry-point name -> why it failed to load; kept so that an unknown-type error can say why
_PLUGIN_ERRORS: dict[str, str] = {}
_PLUGINS_LOADED: list[str] = []
_plugins_done = False


def load_plugins(force: bool = False) -> list[str]:
    """Load every entry point of the ``anymodal.components`` group, once per process.

    An entry point's value is either a module (``mypkg.components``), whose import registers its
    types with the ``register_*`` decorators, or a callable (``mypkg.components:register``), which
    is called with no arguments and registers them. A plugin that fails to load is reported with
    a warning (on stderr) and named in later unknown-type errors, so that a command that needs its
    types says why they are missing; the others still load. Whatever a plugin's import raises is
    caught, ``SystemExit`` included. Returns the names of the entry points loaded.

    A distribution declares one in ``pyproject.toml``::

        [project.entry-points."anymodal.components"]
        mygen = "mypkg.generators"            # a module: importing it registers
        myproj = "mypkg.projectors:register"  # a callable: calling it registers
    """
    global _plugins_done
    if _plugins_done and not force:
        return list(_PLUGINS_LOADED)
    _plugins_done = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _PLUGINS_LOADED:
            continue
        try:
            obj = ep.load()
            if not isinstance(obj, types.ModuleType):
                if not callable(obj):
                    raise TypeError(f"{ep.value!r} is neither a module nor a callable")
                obj()
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # noqa: BLE001 - a broken plugin must not take anymodal down with it:
            # not even one that calls sys.exit() on import (SystemExit), which would end every command,
            # --help included, silently
            what = f"{type(e).__name__}: {e}" if not isinstance(e, SystemExit) else f"sys.exit({e.code!r})"
            _PLUGIN_ERRORS[ep.name] = f"{ep.value!r} raised {what}"
            warnings.warn(f"anymodal plugin {ep.name!r} ({ep.value}) failed to load and is skipped: {what}",
                          stacklevel=2)
            continue
        _PLUGIN_ERRORS.pop(ep.name, None)
        _PLUGINS_LOADED.append(ep.name)
        logger.debug("loaded anymodal plugin %s (%s)", ep.name, ep.value)
    return list(_PLUGINS_LOADED)


def check_component_types(config: Any) -> list[str]:
    """Every component type of an ``AnyModalConfig`` that no registry knows, each as an error line
    listing the registered types (built-in and plugins); empty when all resolve."""
    _load_all()
    problems = []
    checks = [(f"encoders.{name}.type", ENCODERS, e.type) for name, e in config.encoders.items()]
    checks += [(f"input_projectors.{m.value}.type", INPUT_PROJECTORS, p.type)
               for m, p in config.input_projectors.items()]
    checks += [(f"output_projectors.{m.value}.type", OUTPUT_PROJECTORS, p.type)
               for m, p in config.output_projectors.items()]
    checks += [(f"generators.{m.value}.type", GENERATORS, g.type) for m, g in config.generators.items()]
    for where, registry, name in checks:
        if name not in registry:
            problems.append(f"{where}: {registry.unknown_message(name)}")
    for m, g in config.generators.items():
        if g.type in GENERATORS and GENERATORS.get(g.type).modality is not m:
            makes = [t for t in GENERATORS.names() if GENERATORS.get(t).modality is m]
            problems.append(f"generators.{m.value}.type: the {g.type!r} generator makes "
                            f"{GENERATORS.get(g.type).modality.value}, not {m.value}; {m.value} generator types: "
                            f"{', '.join(makes) or 'none registered'}")
    return problems
