"""ShardWriter: size-capped, deterministic, atomic writing of one shard set.

Atomicity: shards are written into a private staging folder and renamed to their final names
only when the set is closed; ``index.jsonl`` follows and ``manifest.json`` comes last. A writer
killed at any point leaves no folder that a reader accepts as a set. The staging folder is named
by host and process id; the next writer into the folder removes it once that process is gone, and
never touches a live (concurrent) writer's folder.
Determinism: tar members carry fixed mtime/owner/mode and the manifest carries no clock time,
so the same samples written in the same order give byte-identical shards and the same digest.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import re
import shutil
import tarfile
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .codec import choose_dtype, encode_array
from .errors import MetadataError, ShardError
from .manifest import (
    INDEX_NAME,
    KINDS,
    MANIFEST_NAME,
    ArrayInfo,
    FileInfo,
    Geometry,
    Manifest,
    ModelRef,
    ParentRef,
    Producer,
    ShardInfo,
    canonical_json,
    kind_spec,
    sha256_hex,
)
from .meta import SampleMeta
from .tario import add_member

KEY_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,199}$")
#: Categorical metadata fields whose vocabularies a manifest records.
VOCAB_FIELDS = (
    "cohort", "site", "modality", "sex", "diagnosis", "handedness", "ethnicity", "race",
    "vendor", "apoe_genotype", "idh1", "mgmt", "tumour_grade", "field_strength",
)  # fmt: skip
DEFAULT_MAX_SHARD_BYTES = 256 << 20


def vocab_value(value: Any) -> str:
    """How a categorical value is spelled in a vocabulary (grade 4 -> '4', 3.0 T -> '3.0')."""
    return str(value)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB blocks: the one file digest every stage uses."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def current_umask() -> int:
    """The process's umask, read without changing it where the kernel tells it (Linux's
    /proc/self/status); elsewhere by setting and restoring it."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], keep_suffix: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that needs a file name (safetensors, nibabel,
    PIL...); when the block ends without an error the file gets the mode the user's umask gives
    (0644 under umask 022, 0664 under 002: never the 0600 of ``mkstemp``, or of safetensors'
    ``save_file``, which creates its files 0600 itself), is fsynced and renamed onto ``path``;
    otherwise it is removed. Parents are created. The name ends in ``.tmp``; ``keep_suffix=True``
    appends the target's extension(s) after it, for writers that choose the format by the name
    (nibabel, SimpleITK: ``.nii.gz``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ("".join(path.suffixes[-2:]) if path.name.endswith(".gz") else path.suffix) if keep_suffix else ""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp{suffix}")
    try:
        yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(f"{tmp}: nothing was written for {path}")
        os.chmod(tmp, 0o666 & ~current_umask())
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a
    part: a temp file beside it (parents created), fsync, then rename (see :func:`atomic_path`;
    the file gets the umask's mode). The temp file is removed if anything fails. The one atomic
    writer of the project: stages call this (or :func:`atomic_path`), never ``mkstemp`` + rename."""
    with atomic_path(path) as tmp, open(tmp, "xb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """:func:`atomic_write_bytes` for text, always UTF-8 (never the locale's encoding)."""
    atomic_write_bytes(path, text.encode("utf-8"))


STAGING_PREFIX = ".staging-"


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:64] or "host"


def staging_name() -> str:
    """``.staging-<host>-<pid>-<random>``: whose staging folder this is, so that another writer can
    tell a live writer's folder from one left by a killed writer."""
    return f"{STAGING_PREFIX}{_host()}-{os.getpid()}-{uuid.uuid4().hex}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, belongs to another user
        return True
    return True


def remove_stale_staging(out_dir: str | os.PathLike[str]) -> list[Path]:
    """Remove the staging folders in ``out_dir`` whose writer is provably gone: named by this
    host and a process id that no longer exists. A live writer's folder (this process included:
    two writers may share it), another host's (its process ids mean nothing here) and one in any
    other format (no owner recorded) are left alone. A reused pid keeps a dead writer's folder
    until that process ends too: the safe direction. Returns the folders removed."""
    removed = []
    host = _host()
    for d in Path(out_dir).glob(STAGING_PREFIX + "*"):
        parts = d.name[len(STAGING_PREFIX):].rsplit("-", 2)
        if len(parts) != 3 or parts[0] != host or not parts[1].isdigit() or not d.is_dir():
            continue
        if not _pid_alive(int(parts[1])):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def _parent_ref(p: Any) -> ParentRef:
    if isinstance(p, ParentRef):
        return p
    if isinstance(p, Manifest):
        return p.as_parent()
    manifest = getattr(p, "manifest", None)
    if isinstance(manifest, Manifest):  # a ShardSet
        return manifest.as_parent(str(getattr(p, "path", "")) or None)
    raise TypeError(f"parent must be a ShardSet, Manifest or ParentRef, not {type(p).__name__}")


class ShardWriter:
    """Write one shard set of a given kind. Use as a context manager; ``manifest`` after close."""

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        kind: str,
        producer: Producer,
        geometry: Geometry | None = None,
        parents: Iterable[Any] = (),
        vocab: Mapping[str, Iterable[str]] | None = None,
        encoder: ModelRef | None = None,
        tokenizer: ModelRef | None = None,
        generator: ModelRef | None = None,
        extra: Mapping[str, Any] | None = None,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        max_shard_samples: int | None = None,
        overwrite: bool = False,
    ) -> None:
        self.spec = kind_spec(kind)
        self.kind = kind
        self.out_dir = Path(out_dir)
        if (self.out_dir / MANIFEST_NAME).exists() and not overwrite:
            raise ShardError(f"{self.out_dir}: already holds a shard set (manifest.json); pass overwrite=True to replace it")
        if kind == "latents" and tokenizer is None and generator is None:
            raise ShardError(f"{self.out_dir}: a latents set must name its tokenizer (tokenizer=ModelRef(...))")
        self.producer = producer
        self.geometry = geometry or Geometry()
        self.parents = [_parent_ref(p) for p in parents]
        self.given_vocab = {k: [vocab_value(v) for v in vs] for k, vs in (vocab or {}).items()}
        self.models = {"encoder": encoder, "tokenizer": tokenizer, "generator": generator}
        self.extra = dict(extra or {})
        self.max_shard_bytes = int(max_shard_bytes)
        self.max_shard_samples = max_shard_samples
        self.overwrite = overwrite
        self.out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(self.out_dir)
        self.staging = self.out_dir / staging_name()
        self.staging.mkdir()
        self.keys: set[str] = set()
        self.index_lines: list[bytes] = []
        self.shards: list[ShardInfo] = []
        self.array_info: dict[str, ArrayInfo] = {}
        self.seen_vocab: dict[str, set[str]] = {f: set() for f in VOCAB_FIELDS}
        self._tar: tarfile.TarFile | None = None
        self._file: Any = None
        self._count = 0
        self.manifest: Manifest | None = None
        self._closed = False

    # ---- context manager -------------------------------------------------------------
    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # ---- writing ----------------------------------------------------------------------
    def _shard_name(self, i: int) -> str:
        return f"{self.kind}-{i:06d}.tar"

    def _open_shard(self) -> None:
        name = self._shard_name(len(self.shards))
        self._file = open(self.staging / name, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        self._count = 0

    def _close_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        name = self._shard_name(len(self.shards))
        path = self.staging / name
        self.shards.append(ShardInfo(name=name, bytes=path.stat().st_size, sha256=file_sha256(path), samples=self._count))
        self._tar, self._file = None, None

    def _check_arrays(self, key: str, arrays: Mapping[str, np.ndarray]) -> None:
        spec = self.spec
        unknown = set(arrays) - set(spec.arrays)
        if unknown:
            raise ShardError(f"sample {key!r}: kind {self.kind!r} has no array {sorted(unknown)} (known: {sorted(spec.arrays)})")
        for name, a in spec.arrays.items():
            if a.required and name not in arrays:
                raise ShardError(f"sample {key!r}: kind {self.kind!r} requires array {name!r}")
        if spec.one_of and not any(n in arrays for n in spec.one_of):
            raise ShardError(f"sample {key!r}: kind {self.kind!r} needs at least one of {list(spec.one_of)}")
        g = self.geometry
        for name, arr in arrays.items():
            a = spec.arrays[name]
            if arr.ndim not in a.ndim:
                raise ShardError(f"sample {key!r}: array {name!r} has {arr.ndim} dimensions, kind {self.kind!r} allows {list(a.ndim)}")
            if arr.dtype.kind == "f":
                bad = int(np.count_nonzero(~np.isfinite(arr)))
                if bad:
                    raise ShardError(f"sample {key!r}: array {name!r} has {bad} NaN/Inf values")
            if self.kind == "volumes" and g.shape is not None and tuple(arr.shape) != tuple(g.shape):
                raise ShardError(f"sample {key!r}: array {name!r} has shape {arr.shape}, the set's geometry is {tuple(g.shape)}")
            if self.kind == "tokens":
                if name == "tokens" and g.num_tokens is not None and arr.shape[0] != g.num_tokens:
                    raise ShardError(f"sample {key!r}: {arr.shape[0]} tokens, the set's grid has {g.num_tokens}")
                if g.channels is not None and arr.shape[-1] != g.channels:
                    raise ShardError(f"sample {key!r}: array {name!r} width {arr.shape[-1]} != geometry.channels {g.channels}")

    def write(self, key: str, meta: SampleMeta | Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
        """Add one sample. Refuses a bad key, a duplicate, invalid metadata or a wrong array."""
        if self._closed:
            raise ShardError(f"{self.out_dir}: writer is closed")
        if not KEY_RE.match(key):
            raise ShardError(f"sample key {key!r} is not allowed: use [a-z0-9_-], start with a letter or digit (see sample_key)")
        if key in self.keys:
            raise ShardError(f"duplicate sample key {key!r} in {self.out_dir}")
        if not isinstance(meta, SampleMeta):
            meta = SampleMeta.validate_record(dict(meta), source=f"sample {key!r}")
        arrays = {n: np.asarray(v) for n, v in arrays.items()}
        self._check_arrays(key, arrays)
        for field, vocab in self.given_vocab.items():
            value = getattr(meta, field, None)
            if value is not None and vocab_value(value) not in vocab:
                raise MetadataError(f"sample {key!r}: field '{field}': value {value!r} is not in the set's vocabulary {vocab}")

        members: list[tuple[str, bytes]] = []
        array_desc: dict[str, dict[str, Any]] = {}
        for name in sorted(arrays):
            arr = arrays[name]
            dtype = choose_dtype(arr, self.spec.arrays[name].stored)
            members.append((f"{key}.{name}.zst", encode_array(arr, dtype)))
            array_desc[name] = {"dtype": dtype, "shape": [int(s) for s in arr.shape]}
        meta_json = meta.model_dump(mode="json")
        doc = canonical_json({"key": key, "meta": meta_json, "arrays": array_desc})
        members.insert(0, (f"{key}.json", doc))
        size = sum(512 + (len(d) + 511) // 512 * 512 for _, d in members)

        if self._tar is not None and self._count > 0:
            full_bytes = self._file.tell() + size > self.max_shard_bytes
            full_count = self.max_shard_samples is not None and self._count >= self.max_shard_samples
            if full_bytes or full_count:
                self._close_shard()
        if self._tar is None:
            self._open_shard()
        for name, data in members:
            add_member(self._tar, name, data)  # type: ignore[arg-type]
        self._count += 1
        self.keys.add(key)
        self.index_lines.append(canonical_json({"key": key, "shard": self._shard_name(len(self.shards)), "meta": meta_json}))
        for field in VOCAB_FIELDS:
            value = getattr(meta, field)
            if value is not None:
                self.seen_vocab[field].add(vocab_value(value))
        for name, desc in array_desc.items():
            info = self.array_info.get(name)
            if info is None:
                self.array_info[name] = ArrayInfo(dtypes=[desc["dtype"]], shape=list(desc["shape"]))
            else:
                if desc["dtype"] not in info.dtypes:
                    info.dtypes.append(desc["dtype"])
                if len(info.shape) != len(desc["shape"]):
                    info.shape = [None] * max(len(info.shape), len(desc["shape"]))
                else:
                    info.shape = [a if a == b else None for a, b in zip(info.shape, desc["shape"])]

    def abort(self) -> None:
        """Drop everything written so far; the output folder is left without a new set."""
        if self._file is not None:
            self._file.close()
        self._tar, self._file = None, None
        shutil.rmtree(self.staging, ignore_errors=True)
        self._closed = True

    def close(self) -> Manifest:
        """Finish the last shard, move shards into place, write the index, then the manifest."""
        if self._closed:
            if self.manifest is None:
                raise ShardError(f"{self.out_dir}: writer was aborted")
            return self.manifest
        self._close_shard()
        vocab = {f: sorted(v) for f, v in self.seen_vocab.items() if v}
        vocab.update(self.given_vocab)
        index_bytes = b"".join(line + b"\n" for line in self.index_lines)
        manifest = Manifest(
            kind=self.kind,
            schema_version=KINDS[self.kind].version,
            producer=self.producer,
            parents=self.parents,
            geometry=self.geometry,
            vocab=vocab,
            arrays=self.array_info,
            shards=self.shards,
            index=FileInfo(name=INDEX_NAME, bytes=len(index_bytes), sha256=sha256_hex(index_bytes)),
            num_samples=len(self.keys),
            extra=self.extra,
            **{k: v for k, v in self.models.items() if v is not None},
        )
        manifest.digest = manifest.compute_digest()
        # 1. invalidate any previous set in this folder, 2. move shards, 3. index, 4. manifest last.
        old_manifest = self.out_dir / MANIFEST_NAME
        if old_manifest.exists():
            old_manifest.unlink()
        for old in self.out_dir.glob("*.tar"):
            if re.match(r"^(volumes|tokens|latents)-\d{6}\.tar$", old.name):
                old.unlink()
        for shard in self.shards:
            os.replace(self.staging / shard.name, self.out_dir / shard.name)
        atomic_write_bytes(self.out_dir / INDEX_NAME, index_bytes)
        atomic_write_bytes(self.out_dir / MANIFEST_NAME, json.dumps(manifest.model_dump(mode="json"), indent=2).encode() + b"\n")
        shutil.rmtree(self.staging, ignore_errors=True)
        self._closed = True
        self.manifest = manifest
        return manifest
