"""The manifest: what a shard set is, who made it from what, and how to check every byte of it.

A shard set is a folder (or URL prefix) holding ``manifest.json``, an ``index.jsonl`` of every
sample's key, shard and metadata, and the ``*.tar`` shards. The manifest is written last, so a
folder without one is never a valid set. Its ``digest`` is the SHA-256 of its own canonical JSON
(without ``digest`` and ``created``) and is what child sets name as their parent.
"""

from __future__ import annotations

import hashlib
import json
import re
from importlib import metadata as importlib_metadata
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ShardFormatError
from .meta import format_validation_error

FORMAT = "g3n-shards"
MANIFEST_NAME = "manifest.json"
INDEX_NAME = "index.jsonl"
REJECTS_NAME = "rejects.jsonl"


class ArraySpec(BaseModel):
    """One array a kind carries: its stored dtype, the dtype readers get, and its shape rule."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    stored: tuple[str, ...]  # allowed storage dtypes, preferred first
    returned: str  # dtype handed to readers
    ndim: tuple[int, ...]  # allowed numbers of dimensions
    required: bool = True


class KindSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    version: str  # schema version "major.minor" this library writes and reads
    arrays: dict[str, ArraySpec]
    one_of: tuple[str, ...] = ()  # at least one of these arrays must be present


#: The kinds of the contract and their schema versions. A reader accepts any minor version of a
#: major it knows (minor bumps only add optional fields); a new major is refused.
KINDS: dict[str, KindSpec] = {
    "volumes": KindSpec(
        version="1.0",
        arrays={
            # float16 keeps ~3 significant digits (rel. error <= 2**-11): plenty for MRI intensities,
            # 2.5x smaller and ~3x faster to read than float32. Out-of-range volumes fall back to float32.
            "volume": ArraySpec(stored=("float16", "float32"), returned="float32", ndim=(3,)),
            "mask": ArraySpec(stored=("uint8",), returned="uint8", ndim=(3,), required=False),
        },
    ),
    "tokens": KindSpec(
        version="1.0",
        arrays={
            "tokens": ArraySpec(stored=("float16", "float32"), returned="float32", ndim=(2,), required=False),
            "mean": ArraySpec(stored=("float32",), returned="float32", ndim=(1,), required=False),
        },
        one_of=("tokens", "mean"),
    ),
    "latents": KindSpec(
        version="1.0",
        arrays={"latent": ArraySpec(stored=("float32",), returned="float32", ndim=(1, 2, 3, 4))},
    ),
}


def canonical_json(obj: Any) -> bytes:
    """Stable bytes for hashing: sorted keys, no whitespace, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def config_digest(config: Any) -> str:
    return "sha256:" + sha256_hex(canonical_json(config))


class Producer(BaseModel):
    """Which package, at which version and with which configuration, made the set."""

    model_config = ConfigDict(extra="forbid")
    package: str
    version: str = "unknown"
    config_digest: str = ""
    config: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _fill(self) -> "Producer":
        if self.version == "unknown":
            try:
                self.version = importlib_metadata.version(self.package)
            except importlib_metadata.PackageNotFoundError:
                pass
        if not self.config_digest:
            self.config_digest = config_digest(self.config or {})
        return self


class Geometry(BaseModel):
    """Where the samples live: volume shape and spacing, patch size, the token grid, channels."""

    model_config = ConfigDict(extra="forbid")
    shape: tuple[int, int, int] | None = None
    spacing: tuple[float, float, float] | None = None
    patch_size: tuple[int, int, int] | None = None
    token_grid: tuple[int, int, int] | None = None
    channels: int | None = Field(default=None, description="feature width per token (hidden or c)")
    affine: list[list[float]] | None = Field(default=None, description="4x4 voxel-to-world (RAS, nibabel)")
    space: str | None = Field(default=None, description="atlas name, e.g. SRI24")

    @model_validator(mode="after")
    def _grid(self) -> "Geometry":
        if self.shape is not None and self.patch_size is not None:
            for s, p in zip(self.shape, self.patch_size):
                if p <= 0 or s % p:
                    raise ValueError(f"shape {self.shape} is not divisible by patch_size {self.patch_size}")
            grid = tuple(s // p for s, p in zip(self.shape, self.patch_size))
            if self.token_grid is None:
                self.token_grid = grid  # type: ignore[assignment]
            elif tuple(self.token_grid) != grid:
                raise ValueError(f"token_grid {self.token_grid} != shape/patch_size {grid}")
        if self.affine is not None:
            if len(self.affine) != 4 or any(len(r) != 4 for r in self.affine):
                raise ValueError("affine must be 4x4")
        return self

    @property
    def num_tokens(self) -> int | None:
        if self.token_grid is None:
            return None
        a, b, c = self.token_grid
        return a * b * c


class ModelRef(BaseModel):
    """A model that made (or is needed to use) the set: e.g. the encoder of a tokens set, the
    tokenizer of a latents set (``entry_point`` is its name in the ``g3n.tokenizers`` registry)."""

    model_config = ConfigDict(extra="forbid")
    name: str
    checkpoint_digest: str | None = None
    checkpoint_path: str | None = None
    entry_point: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)


class ParentRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: str
    digest: str
    path: str | None = None


class FileInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class ShardInfo(FileInfo):
    samples: int = Field(ge=0)


class ArrayInfo(BaseModel):
    """What a set's samples actually hold for one array name (recorded by the writer)."""

    model_config = ConfigDict(extra="forbid")
    dtypes: list[str]
    shape: list[int | None]  # None where samples differ


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: Literal["g3n-shards"] = FORMAT
    kind: str
    schema_version: str = Field(pattern=r"^\d+\.\d+$")
    producer: Producer
    parents: list[ParentRef] = Field(default_factory=list)
    geometry: Geometry = Field(default_factory=Geometry)
    vocab: dict[str, list[str]] = Field(default_factory=dict)
    arrays: dict[str, ArrayInfo] = Field(default_factory=dict)
    encoder: ModelRef | None = None
    tokenizer: ModelRef | None = None
    generator: ModelRef | None = None
    shards: list[ShardInfo]
    index: FileInfo
    num_samples: int = Field(ge=0)
    extra: dict[str, Any] = Field(default_factory=dict)
    created: str | None = None
    digest: str = ""

    def body(self) -> dict[str, Any]:
        d = self.model_dump(mode="json")
        d.pop("digest", None)
        d.pop("created", None)
        return d

    def compute_digest(self) -> str:
        return "sha256:" + sha256_hex(canonical_json(self.body()))

    def as_parent(self, path: str | None = None) -> ParentRef:
        return ParentRef(kind=self.kind, digest=self.digest, path=path)


def kind_spec(kind: str, version: str | None = None, where: str = "") -> KindSpec:
    """The spec of a kind; refuses an unknown kind or a major version this reader does not know."""
    prefix = f"{where}: " if where else ""
    spec = KINDS.get(kind)
    if spec is None:
        raise ShardFormatError(f"{prefix}unknown shard kind {kind!r} (this reader knows: {', '.join(KINDS)})")
    if version is not None:
        if not re.match(r"^\d+\.\d+$", str(version)):
            raise ShardFormatError(f"{prefix}malformed schema version {version!r} for kind {kind!r}")
        if str(version).split(".")[0] != spec.version.split(".")[0]:
            raise ShardFormatError(
                f"{prefix}unsupported schema version {version} of kind {kind!r} "
                f"(this reader supports {kind} {spec.version.split('.')[0]}.x)"
            )
    return spec


def parse_manifest(raw: bytes, where: str) -> Manifest:
    """Parse and check a manifest: format, kind, major version, fields, and its own digest."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardFormatError(f"{where}: manifest is not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ShardFormatError(f"{where}: not a {FORMAT} manifest (format={data.get('format') if isinstance(data, dict) else None!r})")
    kind_spec(str(data.get("kind")), str(data.get("schema_version")), where)
    try:
        m = Manifest.model_validate(data)
    except ValidationError as e:
        raise ShardFormatError(f"{where}: {format_validation_error(e)}") from None
    if m.digest != m.compute_digest():
        raise ShardFormatError(f"{where}: manifest digest mismatch (recorded {m.digest}, computed {m.compute_digest()}): edited or corrupt")
    if sum(s.samples for s in m.shards) != m.num_samples:
        raise ShardFormatError(f"{where}: shard sample counts do not add up to num_samples={m.num_samples}")
    return m
