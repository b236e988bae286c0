"""Frozen dataclasses built fast: the sweep makes thousands a second from rows and session lists.

A frozen dataclass's ``__init__`` sets each field through ``object.__setattr__`` (its guard against
assignment), and a keyword call builds a dict first: for the sixteen fields of a claimed session
that was the dearest Python of a page after the driver's own (docs/benchmarks.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


def positional(cls: type[Any]) -> Callable[..., Any]:
    """A constructor taking every field of frozen slots dataclass ``cls`` in order, skipping its guard.

    Frozen dataclasses set each field with ``object.__setattr__`` in ``__init__``; this sets the slots
    through their descriptors, unrolled as ``dataclasses`` itself writes ``__init__`` (its ``exec``).
    The object is the same: equal, hashable, still frozen to everyone else. No default is applied
    and nothing is checked: the caller passes every field, in the order :func:`dataclasses.fields` gives.
    """
    names = field_names(cls)
    scope: dict[str, Any] = {"_new": object.__new__, "_cls": cls}
    scope |= {f"_set_{n}": getattr(cls, n).__set__ for n in names}
    lines = [f"def make({', '.join(names)}):", "    o = _new(_cls)"]
    lines += [f"    _set_{n}(o, {n})" for n in names] + ["    return o"]
    exec("\n".join(lines), scope)  # our own field names only, as dataclasses does
    made: Callable[..., Any] = scope["make"]
    return made


def field_names(cls: type[Any]) -> tuple[str, ...]:
    """The fields of dataclass ``cls``, in order: what :func:`positional`'s constructor takes."""
    return tuple(f.name for f in dataclasses.fields(cls))
