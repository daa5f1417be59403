"""Name → implementation registries, one per layer, and the config keys each implementation takes.

Implementations register themselves with a decorator and are looked up by the short
name used in the config; an unknown name is an error that lists the known ones. An
implementation that takes config keys of its own declares them as a dataclass whose
fields are made with :func:`key` (type, default, bounds, one-line doc)::

    @dataclass
    class TopKKeys:
        alpha: float = key(0.1, "fraction of coordinates sent", gt=0, le=1)

    @SHARINGS.register("topk", keys=TopKKeys)
    class TopK(Sharing): ...

The config loader validates a section's extra keys against the chosen implementation's
dataclass (see ``dflsplit.config``).
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Callable, Generic, Optional, TypeVar

T = TypeVar("T")


def key(default: Any = dataclasses.MISSING, doc: str = "", *, gt=None, ge=None, lt=None, le=None,
        factory: Optional[Callable[[], Any]] = None) -> Any:
    """A dataclass field for a config key: its default (or `factory`), a one-line doc and
    numeric bounds (`gt` >, `ge` ≥, `lt` <, `le` ≤) that the loader checks."""
    meta = {"doc": doc, "bounds": {k: v for k, v in (("gt", gt), ("ge", ge), ("lt", lt), ("le", le)) if v is not None}}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


_SYMBOLS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
_TESTS = {"gt": lambda v, b: v > b, "ge": lambda v, b: v >= b, "lt": lambda v, b: v < b, "le": lambda v, b: v <= b}


def bounds_text(f: dataclasses.Field) -> str:
    """The bounds of a key as text, e.g. '> 0 and <= 1' ('' when unbounded)."""
    bounds = f.metadata.get("bounds", {}) if f.metadata else {}
    return " and ".join(f"{_SYMBOLS[k]} {v:g}" for k, v in bounds.items())


def out_of_bounds(f: dataclasses.Field, value: Any) -> bool:
    """True when a number `value` breaks the bounds declared for field `f` (None passes)."""
    bounds = f.metadata.get("bounds", {}) if f.metadata else {}
    if value is None or not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    return any(not _TESTS[k](value, b) for k, b in bounds.items())


class Registry(Generic[T]):
    """A named collection of implementations of one layer.

    >>> MODELS = Registry("model")
    >>> @MODELS.register("mlp")
    ... class MLP: ...
    >>> MODELS.get("mlp") is MLP
    True
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._keys: dict[str, Optional[type]] = {}

    def register(self, name: str, keys: Optional[type] = None) -> Callable[[T], T]:
        """Decorator registering an implementation under `name`; `keys` is the dataclass of
        the config keys it takes beyond its section's common keys (None: none)."""
        if keys is not None and not dataclasses.is_dataclass(keys):
            raise TypeError(f"{self.kind} {name!r}: keys must be a dataclass, got {keys!r}")

        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            self._keys[name] = keys
            return obj

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            hint = difflib.get_close_matches(name, self._items, n=1)
            did = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise KeyError(
                f"unknown {self.kind} {name!r}{did}; known: {', '.join(sorted(self._items))}"
            ) from None

    def keys_of(self, name: str) -> Optional[type]:
        """The keys dataclass of implementation `name` (None when it takes no keys of its own)."""
        self.get(name)
        return self._keys[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
