"""g3n-dit sees latents only: no import of g3n_tokenizer (nor g3n_mae) anywhere in the package."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1]
FORBIDDEN = ("g3n_tokenizer", "g3n_mae", "g3n-tokenizer", "g3n-mae")


def _sources():
    return sorted((PKG / "src").rglob("*.py")) + sorted((PKG / "tests").rglob("*.py"))


def test_no_forbidden_imports_in_ast():
    files = _sources()
    assert len(files) > 5
    for f in files:
        tree = ast.parse(f.read_text(), filename=str(f))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__"
            ):
                names = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            for n in names:
                assert n.split(".")[0] not in FORBIDDEN[:2], f"{f}: imports {n}"


def test_no_forbidden_names_in_sources_or_dependencies():
    for f in sorted((PKG / "src").rglob("*.py")):
        text = f.read_text()
        assert "g3n_tokenizer" not in text, f"{f} mentions g3n_tokenizer"
    deps = (PKG / "pyproject.toml").read_text()
    for name in FORBIDDEN[2:]:
        assert f'"{name}' not in deps, f"pyproject depends on {name}"
