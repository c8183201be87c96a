"""The DeepSpeed internals g3n_train reads exist in the installed DeepSpeed (fast: reads its source,
imports nothing), so an upgrade that renames one fails here instead of corrupting a checkpoint."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

from g3n_train.deepspeed_engine import FRAGMENT_HELPERS, PRIVATE_ATTRIBUTES


def _source(module: str) -> ast.Module:
    spec = importlib.util.find_spec("deepspeed")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("DeepSpeed is a dependency of g3n-train but is not installed")
    root = Path(spec.submodule_search_locations[0]).parent
    path = root / (module.replace(".", "/") + ".py")
    assert path.is_file(), f"{module}: no such DeepSpeed module ({path}); the installed DeepSpeed moved it"
    return ast.parse(path.read_text(), filename=str(path))


def _members(tree: ast.Module, cls: str) -> set[str]:
    """Methods of ``cls`` and the attributes its methods assign on ``self``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            out = {n.name for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
            for n in ast.walk(node):
                if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store) and getattr(n.value, "id", "") == "self":
                    out.add(n.attr)
            return out
    pytest.fail(f"DeepSpeed has no class {cls} any more")


@pytest.mark.parametrize("module,cls,attr", PRIVATE_ATTRIBUTES, ids=[f"{c}.{a}" for _, c, a in PRIVATE_ATTRIBUTES])
def test_private_attribute_exists(module, cls, attr):
    assert attr in _members(_source(module), cls), f"{module}.{cls} has no {attr}: update g3n_train.deepspeed_engine"


def test_fragment_helpers_exist():
    tree = _source("deepspeed.utils.tensor_fragment")
    defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert set(FRAGMENT_HELPERS) <= defined


def test_dependency_is_bounded_to_the_tested_minor():
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert '"deepspeed>=0.16,<0.20"' in text
    from importlib.metadata import version

    major, minor = (int(x) for x in version("deepspeed").split(".")[:2])
    assert (major, minor) < (0, 20)
