"""Merge shard sets of one kind (e.g. the parts of a cluster job array) into one set, sorted by key."""

from __future__ import annotations

import heapq
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import ShardError
from .manifest import REJECTS_NAME, Manifest, Producer
from .reader import Sample, ShardSet
from .writer import ShardWriter, atomic_write_bytes


def _sorted_samples(ss: ShardSet) -> Iterator[tuple[str, Sample]]:
    keys = ss.keys()
    if keys == sorted(keys):  # the usual case: stream, one shard in memory at a time
        for s in ss.iter_split(shuffle=False):
            yield s.key, s
    else:  # written out of order: look samples up shard by shard in key order
        for key in sorted(keys):
            yield key, ss.get(key)


def merge_shard_sets(
    inputs: Iterable[ShardSet | str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    producer: Producer | None = None,
    **writer_kwargs: Any,
) -> Manifest:
    """Write the union of ``inputs`` to ``out_dir``, samples in key order, so that the result does not
    depend on how the work was split. Kind, geometry and models must agree; keys must be unique.
    The merged set's parents are the parts' parents; the parts' ``rejects.jsonl`` are concatenated."""
    sets = [s if isinstance(s, ShardSet) else ShardSet.open(s) for s in inputs]
    if not sets:
        raise ShardError("merge: no input sets")
    first = sets[0].manifest
    for s in sets[1:]:
        m = s.manifest
        if m.kind != first.kind:
            raise ShardError(f"merge: {s.location} is a {m.kind!r} set, {sets[0].location} is {first.kind!r}")
        if m.geometry != first.geometry:
            raise ShardError(f"merge: {s.location} has geometry {m.geometry}, {sets[0].location} has {first.geometry}")
        for role in ("encoder", "tokenizer", "generator"):
            if getattr(m, role) != getattr(first, role):
                raise ShardError(f"merge: {s.location} and {sets[0].location} name different {role}s")
    parents = {p.digest: p for s in sets for p in s.manifest.parents}
    writer = ShardWriter(
        out_dir,
        kind=first.kind,
        producer=producer or first.producer,
        geometry=first.geometry,
        parents=list(parents.values()),
        encoder=first.encoder,
        tokenizer=first.tokenizer,
        generator=first.generator,
        extra=first.extra,
        **writer_kwargs,
    )
    with writer:
        for key, sample in heapq.merge(*(_sorted_samples(s) for s in sets), key=lambda kv: kv[0]):
            writer.write(key, sample.meta, sample.arrays)
    rejects = b"".join(
        (Path(s.location) / REJECTS_NAME).read_bytes() for s in sets if (Path(s.location) / REJECTS_NAME).is_file()
    )
    if rejects:
        atomic_write_bytes(Path(out_dir) / REJECTS_NAME, rejects)
    assert writer.manifest is not None
    return writer.manifest


def subset_shard_set(
    source: ShardSet | str | os.PathLike[str],
    keys: Iterable[str],
    out_dir: str | os.PathLike[str],
    producer: Producer | None = None,
    **writer_kwargs: Any,
) -> Manifest:
    """Write the samples of ``source`` whose keys are in ``keys`` (e.g. one split) as a new set,
    in the source's order, naming the source as its parent. Unknown keys are an error, so a
    split file made for another set cannot silently select nothing."""
    src = source if isinstance(source, ShardSet) else ShardSet.open(source)
    wanted = set(keys)
    missing = sorted(wanted - set(src.keys()))
    if missing:
        raise ShardError(f"subset: {len(missing)} key(s) not in {src.location}, e.g. {missing[:3]}")
    m = src.manifest
    writer = ShardWriter(
        out_dir, kind=m.kind, producer=producer or m.producer, geometry=m.geometry, parents=[src],
        vocab=m.vocab, encoder=m.encoder, tokenizer=m.tokenizer, generator=m.generator, extra=m.extra,
        **writer_kwargs,
    )  # fmt: skip
    with writer:
        for sample in src.iter_split(shuffle=False):
            if sample.key in wanted:
                writer.write(sample.key, sample.meta, sample.arrays)
    assert writer.manifest is not None
    return writer.manifest
