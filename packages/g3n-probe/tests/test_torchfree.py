"""g3n-probe installs and runs without torch (a CPU-only hospital site installs it alone).

Two checks: the package's resolved dependency tree (``uv tree --package g3n-probe``) holds no
torch, and this whole test suite passes in a subprocess where ``import torch`` fails.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1]
ROOT = PKG.parents[1]
INNER = "G3N_PROBE_TORCH_BLOCKED"

BLOCKER = '''
import importlib.abc
import sys


class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"{name} is blocked: g3n-probe must run without torch")
        return None


sys.meta_path.insert(0, _NoTorch())
'''


def _blocked_env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tmp_path), env.get("PYTHONPATH", "")) if p)
    env[INNER] = "1"
    return env


def test_blocker_makes_torch_unimportable(tmp_path):
    r = subprocess.run([sys.executable, "-c", "import torch"], env=_blocked_env(tmp_path), capture_output=True, text=True)
    assert r.returncode != 0 and "blocked" in r.stderr


@pytest.mark.skipif(os.environ.get(INNER) == "1", reason="already inside the torch-blocked run")
def test_whole_suite_passes_with_torch_unimportable(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "pytest", str(PKG / "tests"), "-q", "-x", "-p", "no:cacheprovider", "-p", "no:randomly"],
        cwd=ROOT, env=_blocked_env(tmp_path), capture_output=True, text=True, timeout=900,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert re.search(r"\d+ passed", r.stdout)


def test_torch_never_loaded_in_blocked_run():
    if os.environ.get(INNER) != "1":
        pytest.skip("meaningful only inside the torch-blocked run")
    import g3n_probe.cli  # noqa: F401  (everything the package imports)

    assert sys.modules.get("torch") is None


def test_resolved_dependency_tree_has_no_torch():
    uv = shutil.which("uv")
    if uv is None or not (ROOT / "uv.lock").is_file():
        pytest.skip("uv or uv.lock not available")
    r = subprocess.run([uv, "tree", "--package", "g3n-probe", "--frozen", "--offline"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines and lines[0].startswith("g3n-probe")
    assert any("scikit-learn" in ln for ln in lines)  # the check can see real dependencies
    bad = [ln for ln in lines if re.search(r"\b(torch|torchvision|triton|nvidia-[a-z0-9-]+|monai|deepspeed)\b", ln)]
    assert not bad, bad
