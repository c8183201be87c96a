"""Find the shipped models and check that their files are the ones the manifest lists.

``weights/manifest.json`` names each model, the stage package that loads it, the path that
stage's loader takes (a weights file or a checkpoint folder) and the SHA-256 and size of every
file in its folder. Nothing here needs torch: a hospital site that installs only this package and
the probe stage can still read the model cards.

``G3N_ZOO_DIR`` points the package at another folder of the same layout (a zoo rebuilt with
``g3n-zoo-build``, or a copy under test).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from g3n_shards import file_sha256

FORMAT = "g3n-zoo"
VERSION = 1
MANIFEST_NAME = "manifest.json"
ENV_DIR = "G3N_ZOO_DIR"
#: every card carries this line; g3n-embed prints it when it uses a shipped encoder
INTENDED_USE = ("Demonstration only: trained for hours on 2 CPU cores on the demo's small synthetic cohort and 10 "
                "IXI scans (80x96x80, 2 mm); not validated for any clinical or research conclusion.")


class ZooError(RuntimeError):
    """A shipped model is missing, unknown or not the file the manifest lists; the message names it."""


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class ModelEntry(BaseModel):
    """One shipped model: which stage loads it, from which path, and its files."""

    model_config = ConfigDict(extra="forbid")
    stage: str = Field(description="the stage package whose loader reads it, e.g. g3n-mae")
    kind: str = Field(description="mae, mae-cnn, autoencoderkl, dit or bridge")
    load: str = Field(description="path the stage's loader takes, relative to the model folder ('.' = the folder)")
    files: dict[str, FileEntry]


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: str
    version: int
    models: dict[str, ModelEntry]


def root(zoo_dir: str | os.PathLike[str] | None = None) -> Path:
    """The zoo folder: ``zoo_dir``, else ``$G3N_ZOO_DIR``, else the weights shipped in this package."""
    if zoo_dir is not None:
        return Path(zoo_dir)
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR])
    return Path(str(resources.files("g3n_zoo") / "weights"))


def manifest(zoo_dir: str | os.PathLike[str] | None = None) -> Manifest:
    path = root(zoo_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ZooError(f"{path}: no zoo manifest (no shipped models here; `g3n-zoo-build` builds them)")
    try:
        m = Manifest.model_validate_json(path.read_text())
    except (OSError, ValidationError) as e:
        raise ZooError(f"{path}: not a valid zoo manifest: {e}") from None
    if m.format != FORMAT or m.version != VERSION:
        raise ZooError(f"{path}: format {m.format!r} v{m.version}; this g3n-zoo reads {FORMAT!r} v{VERSION}")
    return m


def model_names(zoo_dir: str | os.PathLike[str] | None = None) -> list[str]:
    return sorted(manifest(zoo_dir).models)


@dataclass(frozen=True)
class ZooModel:
    """A shipped model's folder, manifest entry and card."""

    name: str
    entry: ModelEntry
    folder: Path

    @property
    def path(self) -> Path:
        """What the stage's loader takes (e.g. ``g3n-mae encode PATH``, ``g3n-dit sample --checkpoint PATH``)."""
        return (self.folder / self.entry.load) if self.entry.load != "." else self.folder

    @cached_property
    def card(self) -> dict[str, Any]:
        f = self.folder / "card.json"
        try:
            return json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise ZooError(f"{f}: unreadable model card: {e}") from None

    @property
    def intended_use(self) -> str:
        return str(self.card.get("intended_use") or INTENDED_USE)

    def problems(self) -> list[str]:
        """Every way the folder differs from the manifest: a missing, changed or unlisted file."""
        out = []
        for rel, fe in sorted(self.entry.files.items()):
            p = self.folder / rel
            if not p.is_file():
                out.append(f"{p}: missing")
            elif p.stat().st_size != fe.bytes or file_sha256(p) != fe.sha256:
                out.append(f"{p}: SHA-256 differs from {MANIFEST_NAME} (modified or corrupt)")
        if self.folder.is_dir():
            listed = set(self.entry.files)
            for p in sorted(self.folder.rglob("*")):
                if p.is_file() and p.relative_to(self.folder).as_posix() not in listed:
                    out.append(f"{p}: not listed in {MANIFEST_NAME}")
        return out

    def verify(self) -> "ZooModel":
        bad = self.problems()
        if bad:
            raise ZooError(f"shipped model {self.name!r}: " + "; ".join(bad))
        return self


def get(name: str, zoo_dir: str | os.PathLike[str] | None = None, verify: bool = True) -> ZooModel:
    """The shipped model ``name``; with ``verify`` (default) its files are checked against the manifest."""
    m = manifest(zoo_dir)
    if name not in m.models:
        raise ZooError(f"no shipped model {name!r}; shipped: {', '.join(sorted(m.models)) or 'none'}")
    model = ZooModel(name, m.models[name], root(zoo_dir) / name)
    return model.verify() if verify else model


def verify(zoo_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """Problems of every shipped model (empty: all files are the shipped ones)."""
    m = manifest(zoo_dir)
    return [p for name in sorted(m.models) for p in get(name, zoo_dir, verify=False).problems()]


def file_entries(folder: Path) -> dict[str, FileEntry]:
    """Manifest entries of every file under ``folder`` (used when packing a zoo)."""
    return {p.relative_to(folder).as_posix(): FileEntry(sha256=file_sha256(p), bytes=p.stat().st_size)
            for p in sorted(folder.rglob("*")) if p.is_file()}
