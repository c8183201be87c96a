"""The one optimizer-state key format of every checkpoint, and a reader for the older one.

AdamW state is stored as full tensors keyed by parameter name::

    exp_avg/<name>      first moment (fp32, the parameter's shape)
    exp_avg_sq/<name>   second moment
    step/<name>         step count (fp32 scalar)

so it does not depend on the engine, the ZeRO stage, the world size or the order of the
optimizer's groups. g3n-dit checkpoints written before this layer numbered the parameters the way
torch's ``Optimizer.state_dict`` does (``optim.<i>.<key>``, through the param groups in order):
:func:`named_from_numbered` converts them, given the names in that order
(:func:`names_in_group_order`).
"""

from __future__ import annotations

import torch

from .engine import param_groups

KEYS = ("exp_avg", "exp_avg_sq", "step")


def names_in_group_order(module: torch.nn.Module, no_decay_names: tuple[str, ...] = ()) -> list[str]:
    """Parameter names in the order :func:`g3n_train.engine.param_groups` puts them (decay group
    first): the numbering torch's optimizer state_dict gives them."""
    by_id = {id(p): n for n, p in module.named_parameters()}
    return [by_id[id(p)] for g in param_groups(module, 0.0, no_decay_names) for p in g["params"]]


def is_numbered(tensors: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith("optim.") for k in tensors)


def named_from_numbered(tensors: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """``optim.<i>.<key>`` (torch's numbering) -> ``<key>/<names[i]>``; other keys are dropped."""
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if not key.startswith("optim."):
            continue
        _, pid, what = key.split(".", 2)
        i = int(pid)
        if i >= len(names):
            raise ValueError(f"optimizer state for parameter {i}; the model has {len(names)} trainable parameters")
        out[f"{what}/{names[i]}"] = t.float() if what == "step" else t
    return out
