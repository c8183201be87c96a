"""BrainG3N torch-free clinical linear-probe panel (docs/method.md §4).

Fits and applies linear probes on cached embeddings with numpy and scikit-learn only, so a
CPU-only site can install this package alone. Core API::

    from g3n_probe import load_panel, protocol_preset, load_features, run_panel, write_run
    res = run_panel(load_features("tokens/"), load_panel(), protocol_preset("paper"))
    write_run(res, "probe-out/")
"""

__version__ = "0.1.0"

from .apply import apply_probe, apply_probes, find_probes
from .compare import run_compare
from .config import Panel, PanelError, ProtocolConfig, TaskSpec, load_panel, load_protocol, protocol_preset
from .features import FeatureSet, FeatureSourceError, from_arrays, load_feature_table, load_features, write_feature_table
from .linear import LinearProbe, ProbeFileError, fit_classifier
from .panel import PanelResult, SliceResult, Skip, run_panel
from .report import write_compare, write_run
from .ridge import fit_regressor
from .splits import LeakError, assign_folds, check_no_leak

__all__ = [
    "FeatureSet", "FeatureSourceError", "LeakError", "LinearProbe", "Panel", "PanelError", "PanelResult",
    "ProbeFileError", "ProtocolConfig", "Skip", "SliceResult", "TaskSpec", "__version__", "apply_probe",
    "apply_probes", "assign_folds", "check_no_leak", "find_probes", "fit_classifier", "fit_regressor",
    "from_arrays", "load_feature_table", "load_features", "load_panel", "load_protocol", "protocol_preset",
    "run_compare", "run_panel", "write_compare", "write_feature_table", "write_run",
]  # fmt: skip
