"""The tokenizer registry: entry points in the group ``g3n.tokenizers``.

A package makes its tokenizer available to every stage by declaring, in its pyproject::

    [project.entry-points."g3n.tokenizers"]
    my-tokenizer = "my_package.module:MyTokenizer"

where ``MyTokenizer`` follows :class:`g3n_tokenizer.interface.Tokenizer` (in particular the
``from_checkpoint(path)`` classmethod). A ``latents`` manifest records the tokenizer as a
``g3n_shards.ModelRef`` (registry name, checkpoint digest, config); :func:`load_tokenizer` takes
that ModelRef (or a plain name) and returns the tokenizer, checking the checkpoint's digest.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

import torch

import g3n_shards as gs

from .checkpoint import file_sha256, same_digest
from .errors import CheckpointError, TokenizerError
from .interface import Tokenizer

GROUP = "g3n.tokenizers"


def available() -> dict[str, EntryPoint]:
    """Registered tokenizers by name (every installed distribution's ``g3n.tokenizers`` entry points)."""
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def tokenizer_class(name: str) -> type:
    """The class registered under ``name``; a clear error lists what is installed."""
    eps = available()
    if name not in eps:
        raise TokenizerError(
            f"no tokenizer {name!r} in the entry-point group {GROUP!r} (installed: {sorted(eps) or 'none'}); "
            f"install the package that provides it"
        )
    try:
        cls = eps[name].load()
    except Exception as e:  # noqa: BLE001 - a broken plugin is named, not hidden
        raise TokenizerError(f"tokenizer {name!r}: cannot import {eps[name].value!r} ({type(e).__name__}: {e})") from None
    if not callable(getattr(cls, "from_checkpoint", None)):
        raise TokenizerError(f"tokenizer {name!r} ({eps[name].value}) has no from_checkpoint(path) classmethod")
    return cls


def load_tokenizer(name_or_ref: str | gs.ModelRef | gs.Manifest | Any, checkpoint: str | Path | None = None,
                   map_location: str | torch.device = "cpu", verify_digest: bool = True) -> Tokenizer:
    """Load a tokenizer by registry name, by a ModelRef, or by a ``latents`` manifest / ShardSet.

    ``checkpoint`` overrides the path recorded in the ModelRef (checkpoints move between machines;
    the digest does not). With a ModelRef that records a digest, the checkpoint file must match it.
    """
    ref: gs.ModelRef | None = None
    if isinstance(name_or_ref, str):
        name = name_or_ref
    else:
        manifest = getattr(name_or_ref, "manifest", name_or_ref)
        if isinstance(manifest, gs.Manifest):
            if manifest.tokenizer is None:
                raise TokenizerError(f"{manifest.kind} set {manifest.digest[:19]}: its manifest names no tokenizer")
            ref = manifest.tokenizer
        elif isinstance(name_or_ref, gs.ModelRef):
            ref = name_or_ref
        else:
            raise TypeError(f"load_tokenizer: expected a name, ModelRef, Manifest or ShardSet, not {type(name_or_ref).__name__}")
        name = ref.name
    path = checkpoint if checkpoint is not None else (ref.checkpoint_path if ref is not None else None)
    if path is None:
        raise TokenizerError(f"tokenizer {name!r}: no checkpoint given and none recorded")
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: tokenizer checkpoint not found (tokenizer {name!r})")
    if verify_digest and ref is not None and ref.checkpoint_digest and path.is_file():
        got = file_sha256(path)
        if not same_digest(got, ref.checkpoint_digest):
            raise CheckpointError(f"{path}: SHA-256 {got[:12]}... differs from the recorded {ref.checkpoint_digest[:19]}...: "
                                  f"not the checkpoint these latents were made with")
    cls = tokenizer_class(name)
    tok = cls.from_checkpoint(path, map_location=map_location)
    if not isinstance(tok, Tokenizer):
        raise TokenizerError(f"tokenizer {name!r}: {type(tok).__name__} does not implement the Tokenizer interface")
    return tok
