"""g3n-train: the training layer every stage shares; it knows no stage.

* :mod:`g3n_train.dist`: process-group setup (``deepspeed`` launcher, ``torchrun`` or none)
* :mod:`g3n_train.engine` / :mod:`g3n_train.deepspeed_engine`: one engine interface, torch and DeepSpeed
* :mod:`g3n_train.schedule`: learning rate as a pure function of the step
* :mod:`g3n_train.rng`: seeding, RNG state as JSON, deterministic algorithms
* :mod:`g3n_train.guard`: the NaN guard
* :mod:`g3n_train.checkpoint` / :mod:`g3n_train.optim_state`: step folders, one key format
* :mod:`g3n_train.resume`: what a resumed run may change
* :mod:`g3n_train.launcher`: launcher arguments the stages' parsers must not see
"""

from .checkpoint import CheckpointError, CheckpointStore, read_files, read_state, read_tensors, save_tensors
from .dist import Dist, all_mean, barrier, free_port, gather, setup_distributed
from .engine import Engine, EngineSpec, TorchEngine, build_engine, param_groups, resolve_engine, use_bf16
from .guard import NonFiniteLossError, check_loss, non_finite_tensors
from .launcher import strip_launcher_args
from .resume import ResumeConfigError, resolve_resume_config
from .rng import deterministic_algorithms, rng_state, seed_everything, set_rng_state
from .schedule import LRSchedule

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "CheckpointStore", "Dist", "Engine", "EngineSpec", "LRSchedule", "NonFiniteLossError",
    "ResumeConfigError", "TorchEngine", "all_mean", "barrier", "build_engine", "check_loss", "deterministic_algorithms",
    "free_port", "gather", "non_finite_tensors", "param_groups", "read_files", "read_state", "read_tensors",
    "resolve_engine", "resolve_resume_config", "rng_state", "save_tensors", "seed_everything", "set_rng_state",
    "setup_distributed", "strip_launcher_args", "use_bf16",
]
