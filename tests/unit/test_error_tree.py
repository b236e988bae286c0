"""The error tree drawn in ``worker/errors.py``'s docstring is the tree the classes make, and it holds every error.

An error defined elsewhere, or drawn under the wrong parent, is how "what may I catch?" stops having
one answer. The emulator (a separate program) and private control flow (``_``-named) are not ours to draw.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from worker import errors

ROOT = Path(__file__).resolve().parents[2]


def drawn_tree() -> dict[str, str | None]:
    """Each class drawn in the docstring, with the class drawn above it one level up (None for the root)."""
    doc = errors.__doc__ or ""
    lines = [line for line in doc.split("::", 1)[1].split("\n\n", 2)[1].splitlines() if line.strip()]
    parents: dict[str, str | None] = {}
    stack: list[tuple[int, str]] = []
    for line in lines:
        depth = len(line) - len(line.lstrip())
        name = line.split()[0]
        while stack and stack[-1][0] >= depth:
            stack.pop()
        parents[name] = stack[-1][1] if stack else None
        stack.append((depth, name))
    return parents


def test_the_drawn_tree_is_the_class_tree() -> None:
    classes = {
        name: cls
        for name, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, errors.SessionSyncError) and cls.__module__ == errors.__name__
    }
    real = {
        name: (cls.__bases__[0].__name__ if cls is not errors.SessionSyncError else None)
        for name, cls in classes.items()
    }
    assert drawn_tree() == real


def test_no_error_of_ours_lives_outside_errors_py() -> None:
    elsewhere = []
    for path in sorted((ROOT / "worker").rglob("*.py")):
        if path.name == "errors.py" or "emulator" in path.parts:
            continue
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                bases = {ast.unparse(b).split(".")[-1] for b in node.bases}
                if any(b.endswith(("Error", "Exception", "Rejected", "Invalid", "Timeout")) for b in bases):
                    elsewhere.append(f"{path.relative_to(ROOT)}: {node.name}")
    assert elsewhere == []
