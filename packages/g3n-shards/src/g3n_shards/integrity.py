"""The whole-set check: every shard and every sample read as a normal read does, every problem
reported instead of the first raised. A mixin of :class:`~g3n_shards.reader.ShardSet`, which
provides ``manifest``, ``location``, ``_raw_samples`` and ``decode``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .errors import ChecksumError, ShardError

if TYPE_CHECKING:
    from .reader import Sample


class ShardSetIntegrity:
    """:meth:`scan` and :meth:`verify` of a ShardSet."""

    def scan(self, arrays: bool = True, progress: bool = False,
             on_sample: Callable[[Sample], None] | None = None) -> list[str]:
        """Read the whole set as a normal read does (size and SHA-256 of each shard, tar structure,
        index cross-check, each sample's JSON, members and declarations, and with ``arrays`` every
        payload decoded) and return every problem found, one line each naming the shard, the
        sample key where there is one, and the reason, instead of stopping at the first. Whatever
        a normal read refuses is reported here. ``on_sample`` sees each sample that passed."""
        problems: list[str] = []
        shards: Any = self.manifest.shards
        if progress:
            try:  # a progress bar where tqdm is installed; the contract itself does not need it
                from tqdm import tqdm

                shards = tqdm(shards, desc="verify", unit="shard")
            except ImportError:
                pass
        for info in shards:
            try:
                raw = self._raw_samples(info, verify=True)
            except ShardError as e:
                problems.append(str(e))
                continue
            for key, parts in raw:
                try:
                    sample = self.decode(key, parts, info.name, arrays=arrays)
                except ShardError as e:
                    problems.append(str(e))
                    continue
                if on_sample is not None:
                    on_sample(sample)
        return problems

    def verify(self, progress: bool = False) -> list[str]:
        """Check every shard (size, SHA-256, sample count, keys against the index) and every sample
        (JSON against the index, members, declarations, payloads) as :meth:`scan` does. Raises
        ChecksumError listing each problem; returns the shard names when there is none."""
        problems = self.scan(progress=progress)
        if problems:
            raise ChecksumError(f"{self.location}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
        return [s.name for s in self.manifest.shards]
