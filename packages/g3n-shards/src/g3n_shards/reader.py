"""ShardSet: open, iterate, look up, select and verify a shard set, defensively and without torch.

Every shard is read whole (shards are size-capped, 256 MiB by default) and checked against the
manifest before any sample is decoded: its byte count, and by default its SHA-256, computed on the
bytes as they are read (one pass over memory that is already in cache; ``verify=False`` opts
out, for a caller that checked the set already). A truncated, padded or edited shard is an error
naming the shard, never a silent short read. Each sample is then checked against the index: its
key must be listed there, in this shard, with the same metadata as its own JSON (an edit of one
of the two, even with the manifest re-signed, is refused), its declared arrays must fit the kind
and the set's geometry before anything is decompressed.
Distributed reading splits *shards* across (rank, worker) readers, so every sample is seen
exactly once per epoch; the shuffle is a pure function of (seed, epoch, rank, worker) and each
sample carries a cursor from which a resumed job continues exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .codec import decode_array
from .errors import ChecksumError, MetadataError, ShardError, ShardFormatError
from .integrity import ShardSetIntegrity
from .manifest import INDEX_NAME, MANIFEST_NAME, Manifest, ShardInfo, kind_spec, parse_manifest, sha256_hex
from .meta import SampleMeta
from .rawio import READ_BLOCK as READ_BLOCK  # re-exported: these lived here
from .rawio import _join, is_url, read_hashed, read_limited
from .tario import group_samples, iter_members

MAX_MANIFEST_BYTES = 256 << 20
MAX_JSON_BYTES = 1 << 20
#: ShardSet.get keeps the raw samples of its most recently read shards up to this many bytes (at
#: least one shard), so that looking up many keys of one shard reads and parses it once
RECENT_SHARD_BYTES = 512 << 20


@dataclass
class Sample:
    """One decoded sample: key, validated metadata, arrays (float32 / uint8), its shard, a cursor."""

    key: str
    meta: SampleMeta
    arrays: dict[str, np.ndarray]
    shard: str
    cursor: dict[str, Any] | None = field(default=None, repr=False)


class ShardSet(ShardSetIntegrity):
    """A read-only view of one shard set. Open with ``ShardSet.open(path_or_url)``."""

    def __init__(self, location: str, manifest: Manifest, index: list[dict[str, Any]], stored_dtype: bool = False,
                 verify: bool = True) -> None:
        self.location = location
        self.stored_dtype = stored_dtype
        #: check each shard's SHA-256 while reading it (the default); a call's ``verify`` overrides it
        self.verify_sha256 = verify
        self.manifest = manifest
        self._index = index
        self._by_key = {row["key"]: row for row in index}
        self._meta: dict[str, SampleMeta] | None = None
        # shard name -> (verified, its bytes, raw samples by key), least recently used first
        self._recent: OrderedDict[str, tuple[bool, int, dict[str, dict[str, memoryview]]]] = OrderedDict()
        self._recent_lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # a set handed to worker processes travels without its cache
        state = dict(self.__dict__)
        state["_recent"], state["_recent_lock"] = OrderedDict(), None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._recent_lock = threading.Lock()

    # ---- opening ---------------------------------------------------------------------
    @classmethod
    def open(cls, location: str | os.PathLike[str], kind: str | None = None, stored_dtype: bool = False,
             verify: bool = True) -> "ShardSet":
        """Open a set. ``stored_dtype=True`` hands arrays out as stored (e.g. float16 volumes) instead
        of converting to float32: numpy's float16 conversion costs more than decompression, so a torch
        loader that converts on the device (or in torch) should ask for the stored dtype.
        ``verify=False`` skips the SHA-256 of each shard on every read of this set (sizes, the
        index cross-check and every decoding check stay): only for a set verified already."""
        loc = str(location)
        if not is_url(loc) and not (Path(loc) / MANIFEST_NAME).is_file():
            if Path(loc).is_dir():
                raise ShardError(f"{loc}: no manifest.json: not a shard set (or its writer did not finish)")
            raise ShardError(f"{loc}: no such shard set")
        raw = read_limited(_join(loc, MANIFEST_NAME), MAX_MANIFEST_BYTES, loc)
        manifest = parse_manifest(raw, f"{loc}/{MANIFEST_NAME}")
        if kind is not None:
            kind_spec(kind)
            if manifest.kind != kind:
                raise ShardFormatError(f"{loc}: is a {manifest.kind!r} set, expected {kind!r}")
        index_raw = read_limited(_join(loc, INDEX_NAME), manifest.index.bytes, loc)
        if len(index_raw) != manifest.index.bytes or sha256_hex(index_raw) != manifest.index.sha256:
            raise ChecksumError(f"{loc}/{INDEX_NAME}: size or SHA-256 differs from the manifest: edited or corrupt")
        index = [json.loads(line) for line in index_raw.splitlines() if line.strip()]
        counts = Counter(row["shard"] for row in index)
        for s in manifest.shards:
            if counts.get(s.name, 0) != s.samples:
                raise ShardFormatError(f"{loc}/{INDEX_NAME}: lists {counts.get(s.name, 0)} samples for {s.name}, manifest says {s.samples}")
        return cls(loc, manifest, index, stored_dtype, verify)

    # ---- index-only queries ------------------------------------------------------------
    @property
    def kind(self) -> str:
        return self.manifest.kind

    @property
    def digest(self) -> str:
        return self.manifest.digest

    def __len__(self) -> int:
        return self.manifest.num_samples

    def __repr__(self) -> str:
        return f"ShardSet({self.location!r}, kind={self.kind}, samples={len(self)}, shards={len(self.manifest.shards)})"

    def keys(self) -> list[str]:
        return [row["key"] for row in self._index]

    def metadata(self) -> dict[str, SampleMeta]:
        """key -> SampleMeta for every sample, from the index (no shard is read)."""
        if self._meta is None:
            out = {}
            for row in self._index:
                try:
                    out[row["key"]] = SampleMeta.model_validate(row["meta"])
                except Exception as e:  # noqa: BLE001 - re-raised with the file named
                    raise ShardError(f"{self.location}/{INDEX_NAME}: sample {row['key']!r}: {e}") from None
            self._meta = out
        return self._meta

    def select(self, predicate: Callable[[SampleMeta], bool] | None = None, **filters: Any) -> list[str]:
        """Keys whose metadata match: ``select(modality="T1", diagnosis=["HC", "AD"])`` or a predicate."""
        for name in filters:
            if name not in SampleMeta.model_fields:
                raise ValueError(f"select: unknown metadata field {name!r}")
        out = []
        for key, meta in self.metadata().items():
            ok = True
            for name, want in filters.items():
                have = getattr(meta, name)
                ok = have in want if isinstance(want, (list, tuple, set, frozenset)) else have == want
                if not ok:
                    break
            if ok and (predicate is None or predicate(meta)):
                out.append(key)
        return out

    def label_counts(self, field_name: str) -> Counter:
        return Counter(getattr(m, field_name) for m in self.metadata().values())

    # ---- shards ------------------------------------------------------------------------
    def shard_location(self, shard: ShardInfo | str) -> str:
        return _join(self.location, shard if isinstance(shard, str) else shard.name)

    def _shard_info(self, name: str) -> ShardInfo:
        for s in self.manifest.shards:
            if s.name == name:
                return s
        raise ShardError(f"{self.location}: no shard named {name!r} in the manifest")

    def _verify(self, verify: bool | None) -> bool:
        return self.verify_sha256 if verify is None else bool(verify)

    def _load_shard(self, info: ShardInfo, verify: bool) -> memoryview:
        where = self.shard_location(info)
        digest = hashlib.sha256() if verify else None
        data = read_hashed(where, info.bytes, where, digest)
        if len(data) < info.bytes:
            raise ChecksumError(f"{where}: truncated: {len(data)} bytes, the manifest records {info.bytes}")
        if len(data) > info.bytes:
            raise ChecksumError(f"{where}: larger than the {info.bytes} bytes the manifest records")
        if digest is not None and digest.hexdigest() != info.sha256:
            raise ChecksumError(f"{where}: SHA-256 mismatch: the shard was modified or corrupted after it was written "
                                f"(recorded {info.sha256[:16]}..., read {digest.hexdigest()[:16]}...)")
        return data

    def _raw_samples(self, info: ShardInfo, verify: bool) -> list[tuple[str, dict[str, memoryview]]]:
        where = self.shard_location(info)
        samples = list(group_samples(iter_members(self._load_shard(info, verify), where), where))
        if len(samples) != info.samples:
            raise ShardError(f"{where}: holds {len(samples)} samples, the manifest records {info.samples}")
        for key, _ in samples:
            row = self._by_key.get(key)
            if row is None:
                raise ShardError(f"{where}:{key}: sample {key!r} is in the shard but not in {INDEX_NAME}")
            if row["shard"] != info.name:
                raise ShardError(f"{where}:{key}: sample {key!r} is in this shard but {INDEX_NAME} lists it in {row['shard']}")
        return samples

    def _check_index_meta(self, key: str, doc_meta: Any, meta: SampleMeta, where: str) -> None:
        """The sample's own JSON and the index must say the same thing about it."""
        row = self._by_key.get(key)
        if row is None:
            raise ShardError(f"{where}: sample {key!r} is not in {INDEX_NAME}")
        if doc_meta == row["meta"]:
            return
        listed = self.metadata()[key]
        if listed == meta:  # spelled differently, same values
            return
        a, b = listed.model_dump(mode="json"), meta.model_dump(mode="json")
        diffs = [f"{f}: index {a[f]!r}, sample JSON {b[f]!r}" for f in a if a[f] != b.get(f)]
        raise ShardError(f"{where}: the sample JSON's metadata differs from {INDEX_NAME} ({'; '.join(diffs)}): "
                         f"edited or corrupt")

    def _check_geometry(self, name: str, shape: list[Any], where: str) -> None:
        """A declared shape the set's geometry does not allow is refused before decompressing."""
        g = self.manifest.geometry
        if self.kind == "volumes" and g.shape is not None and list(shape) != list(g.shape):
            raise ShardError(f"{where}: array {name!r} declared with shape {shape}, the set's geometry is {list(g.shape)}")
        if self.kind == "tokens":
            if name == "tokens" and g.num_tokens is not None and shape[0] != g.num_tokens:
                raise ShardError(f"{where}: array 'tokens' declares {shape[0]} tokens, the set's grid has {g.num_tokens}")
            if g.channels is not None and shape[-1] != g.channels:
                raise ShardError(f"{where}: array {name!r} declared width {shape[-1]}, geometry.channels is {g.channels}")

    def decode(self, key: str, parts: dict[str, memoryview], shard: str, arrays: bool = True) -> Sample:
        """Turn one sample's raw members into a Sample, checking everything against the kind, the
        geometry and the index. ``arrays=False`` checks the declarations but decompresses nothing
        (the Sample then has no arrays)."""
        where = f"{self.shard_location(shard)}:{key}"
        parts = dict(parts)
        doc_raw = parts.pop("json", None)
        if doc_raw is None:
            raise ShardError(f"{where}: sample has no .json member")
        if len(doc_raw) > MAX_JSON_BYTES:
            raise ShardError(f"{where}: sample JSON larger than {MAX_JSON_BYTES} bytes")
        try:
            doc = json.loads(bytes(doc_raw))
            meta = SampleMeta.validate_record(doc["meta"], source=where)
            desc = doc["arrays"]
            if doc.get("key") != key or not isinstance(desc, dict):
                raise ValueError("key or arrays field does not match the member names")
        except MetadataError as e:
            raise ShardError(str(e)) from None
        except (ValueError, KeyError, TypeError) as e:
            raise ShardError(f"{where}: malformed sample JSON ({e})") from None
        self._check_index_meta(key, doc["meta"], meta, where)
        spec = kind_spec(self.kind)
        expected = {f"{name}.zst" for name in desc}
        if set(parts) != expected:
            raise ShardError(f"{where}: members {sorted(parts)} do not match the declared arrays {sorted(expected)}")
        for name, d in desc.items():
            a = spec.arrays.get(name)
            if a is None:
                raise ShardError(f"{where}: kind {self.kind!r} has no array {name!r}")
            if not isinstance(d, dict) or d.get("dtype") not in a.stored or not isinstance(d.get("shape"), list) or len(d["shape"]) not in a.ndim:
                raise ShardError(f"{where}: array {name!r} declared as {d!r}, not allowed for kind {self.kind!r}")
            self._check_geometry(name, d["shape"], where)
        out = {}
        for name, d in desc.items() if arrays else ():
            a = spec.arrays[name]
            arr = decode_array(parts[f"{name}.zst"], d["dtype"], d["shape"], f"{where}.{name}")
            out[name] = arr if self.stored_dtype else arr.astype(a.returned, copy=arr.dtype != np.dtype(a.returned))
        return Sample(key=key, meta=meta, arrays=out, shard=shard)

    # ---- iteration ---------------------------------------------------------------------
    def __iter__(self) -> Iterator[Sample]:
        return self.iter_split(shuffle=False)

    def get(self, key: str, verify: bool | None = None) -> Sample:
        row = self._by_key.get(key)
        if row is None:
            raise KeyError(f"{self.location}: no sample with key {key!r}")
        info = self._shard_info(row["shard"])
        parts = self._shard_samples(info, self._verify(verify)).get(key)
        if parts is None:
            raise ShardError(f"{self.shard_location(info)}: sample {key!r} listed in the index but not in the shard")
        return self.decode(key, parts, info.name)

    def _shard_samples(self, info: ShardInfo, verify: bool) -> dict[str, dict[str, memoryview]]:
        """One shard's raw samples by key, through a small cache of the shards read last
        (:data:`RECENT_SHARD_BYTES`): a merge of a set written out of key order looks up every key
        of a shard in turn, and re-reading the whole shard for each made it quadratic (23 s for
        the demo's 284 synthetic volumes in one 108 MB shard). A shard read with ``verify=False`` is
        read again, checked, when a lookup asks for it."""
        with self._recent_lock:
            hit = self._recent.get(info.name)
            if hit is not None and (hit[0] or not verify):
                self._recent.move_to_end(info.name)
                return hit[2]
        samples = dict(self._raw_samples(info, verify))
        with self._recent_lock:
            self._recent[info.name] = (verify, info.bytes, samples)
            self._recent.move_to_end(info.name)
            while len(self._recent) > 1 and sum(r[1] for r in self._recent.values()) > RECENT_SHARD_BYTES:
                self._recent.popitem(last=False)
        return samples

    def readers_check(self, world_size: int, num_workers: int) -> None:
        """Each (rank, worker) reader needs a shard of its own. An empty set (0 samples: e.g. a cohort
        whose every input was rejected) has no shards, and every reader simply gets nothing."""
        readers = world_size * num_workers
        if 0 < len(self.manifest.shards) < readers:
            raise ShardError(
                f"{self.location}: {len(self.manifest.shards)} shards for {world_size} ranks x {num_workers} workers = "
                f"{readers} readers; each reader needs at least one shard. Write the set with smaller shards "
                f"(max_shard_samples) or use fewer workers."
            )

    def assigned_shards(self, rank: int = 0, world_size: int = 1, worker: int = 0, num_workers: int = 1,
                        seed: int = 0, epoch: int = 0, shuffle: bool = True) -> list[ShardInfo]:
        """The shards one (rank, worker) reader gets this epoch: a seeded shuffle, then a stride."""
        if not (0 <= rank < world_size and 0 <= worker < num_workers):
            raise ValueError(f"rank {rank}/{world_size} or worker {worker}/{num_workers} out of range")
        self.readers_check(world_size, num_workers)
        if not self.manifest.shards:
            return []
        order = np.arange(len(self.manifest.shards))
        if shuffle:
            order = np.random.default_rng([seed, epoch]).permutation(order)
        g = rank * num_workers + worker
        return [self.manifest.shards[i] for i in order[g :: world_size * num_workers]]

    def iter_split(self, rank: int = 0, world_size: int = 1, worker: int = 0, num_workers: int = 1,
                   seed: int = 0, epoch: int = 0, shuffle: bool = True, cursor: dict[str, Any] | None = None,
                   verify: bool | None = None) -> Iterator[Sample]:
        """This reader's samples for one epoch; resume mid-epoch by passing a sample's ``cursor``.
        ``verify`` (default: the set's, True) checks each shard's SHA-256 as it is read."""
        verify = self._verify(verify)
        mine = self.assigned_shards(rank, world_size, worker, num_workers, seed, epoch, shuffle)
        start_pos, start_sample = 0, 0
        ident = {"set": self.digest, "epoch": epoch, "rank": rank, "world_size": world_size,
                 "worker": worker, "num_workers": num_workers, "seed": seed, "shuffle": shuffle}
        if cursor is not None:
            mismatched = {k: (cursor.get(k), v) for k, v in ident.items() if cursor.get(k) != v}
            if mismatched:
                raise ShardError(f"{self.location}: cursor does not belong to this reader: {mismatched} (saved, now)")
            start_pos, start_sample = int(cursor["shard_pos"]), int(cursor["sample"])
        for pos in range(start_pos, len(mine)):
            info = mine[pos]
            raw = self._raw_samples(info, verify)
            order = np.arange(len(raw))
            if shuffle:
                order = np.random.default_rng([seed, epoch, rank, worker, pos]).permutation(order)
            for j in range(start_sample if pos == start_pos else 0, len(raw)):
                key, parts = raw[order[j]]
                sample = self.decode(key, parts, info.name)
                sample.cursor = {**ident, "shard": info.name, "shard_pos": pos, "sample": j + 1}
                yield sample

    def webdataset(self, shuffle: bool = True, seed: int = 0, epoch: int = 0, verify: bool | None = None) -> Any:
        """A WebDataset pipeline over this set's shard URLs (split by node and worker by WebDataset)
        that yields decoded Samples. For streaming from object storage into a torch DataLoader."""
        import webdataset as wds

        verify = self._verify(verify)

        infos = {self.shard_location(s): s for s in self.manifest.shards}
        urls = list(infos)
        if shuffle:
            urls = [urls[i] for i in np.random.default_rng([seed, epoch]).permutation(len(urls))]

        def expand(src: Iterator[dict[str, Any]]) -> Iterator[Sample]:
            for item in src:
                info = infos[item["url"]]
                for key, parts in self._raw_samples(info, verify):
                    yield self.decode(key, parts, info.name)

        return wds.DataPipeline(wds.SimpleShardList(urls), wds.split_by_node, wds.split_by_worker, expand)
