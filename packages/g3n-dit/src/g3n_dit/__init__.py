"""BrainG3N conditional flow-matching DiT, guidance, forecasting, counterfactuals.

Works on ``latents`` shard sets only (it never imports a tokenizer): ``train`` learns a
conditional flow from noise to latents, ``sample`` generates with per-condition guidance,
``train-longitudinal`` / ``forecast`` learn and integrate a bridge from a baseline to a
follow-up latent, ``counterfactual`` inverts a real latent and regenerates it under changed
conditions.
"""

__version__ = "0.1.0"

from .config import (  # noqa: E402
    BridgeConfig,
    ConditionSpec,
    DiTConfig,
    RunConfig,
    SampleConfig,
    TrainConfig,
    load_run_config,
    preset_run_config,
)
from .model import DiT  # noqa: E402

__all__ = [
    "BridgeConfig", "ConditionSpec", "DiT", "DiTConfig", "RunConfig", "SampleConfig", "TrainConfig",
    "__version__", "load_run_config", "preset_run_config",
]  # fmt: skip
