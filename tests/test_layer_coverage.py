"""Every registered layer type has a gradient check (or is declared to have no backward) in
some test module: adding a layer without its test fails here."""

from __future__ import annotations

import importlib
from pathlib import Path

from netforge.layers import REGISTRY

TESTS = Path(__file__).resolve().parent


def declared() -> tuple[set[str], set[str]]:
    checked: set[str] = set()
    no_backward: set[str] = set()
    for path in sorted(TESTS.glob("test_*.py")):
        module = importlib.import_module(f"tests.{path.stem}")
        checked |= set(getattr(module, "GRAD_CHECKED", ()))
        no_backward |= set(getattr(module, "NO_BACKWARD", ()))
    return checked, no_backward


def test_every_layer_type_is_gradient_checked() -> None:
    checked, no_backward = declared()
    missing = sorted(set(REGISTRY) - checked - no_backward)
    assert not missing, f"layer types without a gradient check: {missing}"
    for name in no_backward:
        assert not REGISTRY[name].has_backward, f"{name} is declared NO_BACKWARD but has one"


def test_declarations_name_real_types() -> None:
    checked, no_backward = declared()
    assert not (checked | no_backward) - set(REGISTRY)
