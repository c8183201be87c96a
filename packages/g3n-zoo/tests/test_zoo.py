"""The zoo's own checks, torch-free: manifest, digests, cards, the CLI; on a made-up zoo and on the shipped one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import g3n_zoo
from g3n_zoo import cli
from g3n_zoo.zoo import FORMAT, VERSION, Manifest, ModelEntry, file_entries


def make_zoo(root: Path) -> Path:
    folder = root / "toy"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights" * 10)
    (folder / "card.json").write_text(json.dumps({"name": "toy", "title": "a toy", "intended_use": "testing only",
                                                  "training": {"steps": 3, "wall_minutes": 0.1, "machine": "x"}}))
    (folder / "card.md").write_text("# toy\n")
    man = Manifest(format=FORMAT, version=VERSION, models={"toy": ModelEntry(
        stage="g3n-mae", kind="mae", load="model.safetensors", files=file_entries(folder))})
    (root / "manifest.json").write_text(man.model_dump_json())
    return root


def test_a_zoo_that_matches_its_manifest_verifies(tmp_path):
    root = make_zoo(tmp_path / "zoo")
    assert g3n_zoo.verify(root) == []
    m = g3n_zoo.get("toy", root)
    assert m.path == root / "toy" / "model.safetensors" and m.intended_use == "testing only"
    assert g3n_zoo.model_names(root) == ["toy"]


@pytest.mark.parametrize("damage", ["edit", "remove", "extra"])
def test_a_changed_missing_or_unlisted_file_is_named(tmp_path, damage):
    root = make_zoo(tmp_path / "zoo")
    target = root / "toy" / "model.safetensors"
    if damage == "edit":
        target.write_bytes(b"weightz" * 10)  # same length
    elif damage == "remove":
        target.unlink()
    else:
        (root / "toy" / "notes.txt").write_text("?")
    problems = g3n_zoo.verify(root)
    assert len(problems) == 1
    assert ("model.safetensors" in problems[0]) if damage != "extra" else ("notes.txt" in problems[0])
    with pytest.raises(g3n_zoo.ZooError, match="toy"):
        g3n_zoo.get("toy", root)
    assert g3n_zoo.get("toy", root, verify=False).name == "toy"  # a reader may still look at the card


def test_unknown_model_and_missing_or_foreign_manifest(tmp_path):
    root = make_zoo(tmp_path / "zoo")
    with pytest.raises(g3n_zoo.ZooError, match="no shipped model 'dit'; shipped: toy"):
        g3n_zoo.get("dit", root)
    with pytest.raises(g3n_zoo.ZooError, match="no zoo manifest"):
        g3n_zoo.manifest(tmp_path / "empty")
    doc = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps({**doc, "version": VERSION + 1}))
    with pytest.raises(g3n_zoo.ZooError, match="this g3n-zoo reads"):
        g3n_zoo.manifest(root)


def test_cli_uses_the_env_folder(tmp_path, monkeypatch, capsys):
    root = make_zoo(tmp_path / "zoo")
    monkeypatch.setenv("G3N_ZOO_DIR", str(root))
    assert cli.main(["verify"]) == 0 and "OK: 1 models" in capsys.readouterr().out
    assert cli.main(["list"]) == 0 and "toy" in capsys.readouterr().out
    assert cli.main(["path", "toy"]) == 0 and capsys.readouterr().out.strip() == str(root / "toy" / "model.safetensors")
    (root / "toy" / "card.md").write_text("changed")
    assert cli.main(["verify"]) == 1 and "BAD" in capsys.readouterr().out
    assert cli.main(["path", "nope"]) == 2 and "no shipped model" in capsys.readouterr().err


SHIPPED = {"mae", "mae-cnn", "autoencoderkl", "dit", "bridge"}


def absolute_paths(obj) -> list[str]:
    """Every word of every string in a JSON record that is an absolute path (a command line's too)."""
    if isinstance(obj, dict):
        return [p for v in obj.values() for p in absolute_paths(v)]
    if isinstance(obj, list):
        return [p for v in obj for p in absolute_paths(v)]
    if isinstance(obj, str):
        return [w.strip("'\"") for w in obj.split() if w.strip("'\"").startswith("/") and w.count("/") > 1]
    return []


def test_absolute_paths_are_found_in_commands_and_values():
    assert absolute_paths({"a": ["python -m x --out '/tmp/run/x'"], "b": "$RUN/latents"}) == ["/tmp/run/x"]
    assert absolute_paths({"c": "packages/g3n-pipeline/zoo.yaml", "d": "a/b or c"}) == []


def test_the_shipped_zoo_is_complete_small_and_intact(monkeypatch):
    monkeypatch.delenv("G3N_ZOO_DIR", raising=False)
    m = g3n_zoo.manifest()
    assert SHIPPED <= set(m.models)
    assert g3n_zoo.verify() == []
    total = sum(f.bytes for e in m.models.values() for f in e.files.values())
    assert total <= 60 * 2**20, f"the shipped models take {total / 2**20:.1f} MiB (limit 60)"
    for name in m.models:
        model = g3n_zoo.get(name)
        card = model.card
        # a model card: data, steps, wall time, machine, final losses, intended use, config, command
        assert card["intended_use"] == g3n_zoo.INTENDED_USE
        assert card["data"]["digest"].startswith("sha256:") and card["data"]["volumes"] > 0
        tr = card["training"]
        assert tr["steps"] > 0 and tr["wall_minutes"] and tr["machine"] and tr["final"]
        assert card["command"] and all("$RUN" in c or "python -m" in c for c in card["command"])
        assert (model.folder / "config.json").is_file() and (model.folder / "card.md").is_file()
        for f in model.folder.iterdir():  # no file holds a path of the machine that built it
            if f.suffix == ".json":
                assert not absolute_paths(json.loads(f.read_text())), (f, absolute_paths(json.loads(f.read_text())))
        assert model.path.exists()
