"""Name -> constructor registries with "did you mean" errors.

One decorator registers a constructor under a name; ``create`` builds it and an
unknown name raises a ``KeyError``-compatible ``ValueError`` that lists the closest
registered names.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, Generic, Iterable, Optional, TypeVar

T = TypeVar("T")


def suggest(name: str, choices: Iterable[str]) -> str:
    """Return a ``" Did you mean 'x'?"`` hint for ``name`` among ``choices`` ('' if none is close)."""
    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""


class Registry(Generic[T]):
    """A mapping from names to constructors.

    Args:
        kind: what the registry holds, used in error messages (``"attack"``, ``"model"``).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator that registers ``fn`` under ``name``; a duplicate name is an error."""

        def deco(fn: Callable[..., T]) -> Callable[..., T]:
            if name in self._items and self._items[name] is not fn:
                raise ValueError(f"{self.kind} '{name}' is already registered.")
            self._items[name] = fn
            return fn

        return deco

    def register_class(self, name: str, base: Optional[type] = None) -> Callable[[type], type]:
        """Class decorator that registers ``cls`` under ``name`` and sets ``cls.name = name``.

        Raises:
            ValueError: ``base`` is given and ``cls`` is not a subclass of it; a duplicate name.
        """

        def deco(cls: type) -> type:
            if base is not None and not (isinstance(cls, type) and issubclass(cls, base)):
                raise ValueError(f"{self.kind} {name!r} must be a {base.__name__} subclass, got {cls!r}.")
            self.register(name)(cls)
            cls.name = name  # type: ignore[attr-defined]
            return cls

        return deco

    def get(self, name: str) -> Callable[..., T]:
        """The constructor registered as ``name``; unknown names raise with a suggestion."""
        if not isinstance(name, str) or name not in self._items:
            known = ", ".join(self.names())
            raise ValueError(
                f"Unknown {self.kind} '{name}'.{suggest(str(name), self._items)} Known: {known}."
            )
        return self._items[name]

    def create(self, name: str, *args: Any, **kwargs: Any) -> T:
        """Build the ``name`` entry with the given arguments."""
        return self.get(name)(*args, **kwargs)

    def names(self) -> list[str]:
        """Sorted registered names."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items


def import_submodules(package: str, path: Iterable[str]) -> list[str]:
    """Import every module of a package (in name order) and return their names.

    The registries' packages (attacks, defences, model sources) call this from their
    ``__init__`` so that a new extension is one new file whose decorator registers it on import.

    Args:
        package: the package's dotted name (``__name__`` of its ``__init__``).
        path: the package's ``__path__``.
    """
    import importlib
    import pkgutil

    names = sorted(m.name for m in pkgutil.iter_modules(list(path)))
    for name in names:
        importlib.import_module(f"{package}.{name}")
    return names


def lazy_exports(module: str, table: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for a package that exports names lazily (PEP 562), so that
    importing it stays light (``volattack --help`` never imports torch).

    Args:
        module: the package's dotted name (``__name__``).
        table: exported name -> dotted name of the module that defines it.

    Returns:
        ``(__getattr__, __dir__)``; the first access to a name imports its module and caches the
        value in the package's namespace.
    """
    import importlib
    import sys

    def getattr_(name: str) -> Any:
        if name in table:
            value = getattr(importlib.import_module(table[name]), name)
            setattr(sys.modules[module], name, value)
            return value
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    def dir_() -> list[str]:
        return sorted(set(vars(sys.modules[module])) | set(table))

    return getattr_, dir_
