import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from g3n_tokenizer.errors import TokenizerError
from g3n_tokenizer.registry import GROUP, available, load_tokenizer

TOY = Path(__file__).parent / "fixtures" / "toy_tokenizer"


def test_our_tokenizers_are_registered():
    eps = available()
    assert eps["mae-cnn"].value == "g3n_tokenizer.mae_cnn:MaeCnnTokenizer"
    assert eps["autoencoderkl"].value == "g3n_tokenizer.autoencoderkl:AutoencoderKLTokenizer"


def test_unknown_tokenizer_names_what_is_installed(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"")
    with pytest.raises(TokenizerError, match=r"no tokenizer 'nope'.*mae-cnn"):
        load_tokenizer("nope", checkpoint=tmp_path / "x.safetensors")


def _install_toy(target: Path) -> None:
    """Install the toy package into ``target`` like any installer would (wheel contents + dist-info)."""
    uv = shutil.which("uv")
    if uv is not None:
        r = subprocess.run([uv, "pip", "install", "--offline", "--no-deps", "--quiet", "--python", sys.executable,
                            "--target", str(target), str(TOY)], capture_output=True, text=True)
        if r.returncode == 0:
            return
    # No uv (or no offline build backend): lay out what the wheel would install.
    shutil.copytree(TOY / "src" / "g3n_toy_tokenizer", target / "g3n_toy_tokenizer")
    info = target / "g3n_toy_tokenizer-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: g3n-toy-tokenizer\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(f"[{GROUP}]\ntoy-avgpool = g3n_toy_tokenizer:AvgPoolTokenizer\n")


def test_registry_swap_with_a_separate_package(tmp_path, volumes_set):
    """Another package registers its tokenizer; encode and decode run through the registry only."""
    target = tmp_path / "site"
    _install_toy(target)
    assert (target / "g3n_toy_tokenizer").is_dir()
    ckpt = tmp_path / "toy.json"
    ckpt.write_text(json.dumps({"shape": [32, 32, 32], "patch": 8}))
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np, torch
        import g3n_shards as gs
        from g3n_tokenizer.registry import available, load_tokenizer
        from g3n_tokenizer.shardio import encode_set, decode_set
        from g3n_tokenizer.interface import Tokenizer
        assert "toy-avgpool" in available(), sorted(available())
        tok = load_tokenizer("toy-avgpool", checkpoint={str(ckpt)!r})
        assert isinstance(tok, Tokenizer)
        m = encode_set(tok, {str(volumes_set)!r}, {str(tmp_path / 'lat')!r}, progress=False)
        lat = gs.ShardSet.open({str(tmp_path / 'lat')!r})
        # decode finds the tokenizer from the manifest alone (name + checkpoint + digest)
        s = decode_set(lat, {str(tmp_path / 'dec')!r}, progress=False)
        dec = gs.ShardSet.open({str(tmp_path / 'dec')!r})
        one = next(iter(lat))
        vol = dec.get(one.key).arrays["volume"]
        print(json.dumps({{"name": m.tokenizer.name, "entry_point": m.tokenizer.entry_point,
                          "latent_shape": list(one.arrays["latent"].shape), "written": s["written"],
                          "type": type(tok).__module__, "patch_mean_ok": bool(np.allclose(vol[:8, :8, :8],
                          one.arrays["latent"][0, 0], atol=1e-2))}}))
    """)
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out == {"name": "toy-avgpool", "entry_point": "g3n_toy_tokenizer:AvgPoolTokenizer", "latent_shape": [64, 1],
                   "written": 12, "type": "g3n_toy_tokenizer", "patch_mean_ok": True}
    # ... and this (parent) environment was not changed
    assert "toy-avgpool" not in available()
