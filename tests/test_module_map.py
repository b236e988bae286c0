"""The README's module map and the tree agree: every module under ``worker/`` listed once, none invented,
in the layers ``tests/test_layers.py`` checks the imports against."""

from __future__ import annotations

import re

from tests.test_layers import LAYERS, MODULES, ROOT

README = ROOT / "README.md"


def module_map() -> dict[str, list[str]]:
    """The README's map: each layer's modules, as dotted names under ``worker``, in the table's order."""
    text = README.read_text(encoding="utf-8")
    section = text.split("### Module map", 1)[1].split("\n#", 1)[0]
    layers: dict[str, list[str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 2 or cells[0] in ("layer", "---"):
            continue
        # Each module is the first backticked word of an item; what follows it in brackets describes it.
        names = re.findall(r"(?:^|, )`([\w.]+)`", re.sub(r"\([^)]*\)", "", cells[1]))
        layers[cells[0]] = ["worker" if n == "__init__" else f"worker.{n}" for n in names]
    return layers


def test_the_map_lists_every_module_once_and_invents_none() -> None:
    listed = [m for modules in module_map().values() for m in modules]
    assert sorted(set(MODULES) - set(listed)) == [], "add them to the README's module map"
    assert sorted(set(listed) - set(MODULES)) == [], "the README's module map names modules that do not exist"
    assert len(listed) == len(set(listed))


def test_the_map_draws_the_layers_the_imports_keep() -> None:
    drawn = module_map()
    assert list(drawn) == list(LAYERS)
    assert {layer: sorted(m) for layer, m in drawn.items()} == {layer: sorted(m) for layer, m in LAYERS.items()}
