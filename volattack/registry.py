"""Name -> constructor registries with "did you mean" errors.

One decorator registers a constructor under a name; ``create`` builds it and an
unknown name raises a ``KeyError``-compatible ``ValueError`` that lists the closest
registered names.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, Generic, Iterable, TypeVar

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
