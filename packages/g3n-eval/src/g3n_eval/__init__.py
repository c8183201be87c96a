"""BrainG3N evaluation: reconstruction, controllability, fidelity, memorisation, forecasts, report.

Pure measurement functions (numpy / torch, no I/O) live in :mod:`metrics`, :mod:`frechet`,
:mod:`memorisation`, :mod:`controllability` and :mod:`forecast`; :mod:`inception` holds the
Inception-V3 feature extractor (weights only from a user-given safetensors file); the
``g3n-eval`` command (:mod:`cli`) runs them on shard sets and writes metrics JSON files that
:mod:`report` turns into one HTML page.
"""

__version__ = "0.1.0"

from .records import PROTOCOL_VERSION  # noqa: E402

__all__ = ["PROTOCOL_VERSION", "__version__"]
