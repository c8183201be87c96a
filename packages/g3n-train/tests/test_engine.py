"""The torch engine (state by name, NaN guard, fused/unfused restore) and engine resolution."""

from __future__ import annotations

import builtins
import math

import pytest
import torch

from g3n_train import Dist, EngineSpec, NonFiniteLossError, TorchEngine, check_loss, param_groups, resolve_engine
from g3n_train.engine import load_optimizer_state_by_name, optimizer_state_by_name


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)
        self.mask_token = torch.nn.Parameter(torch.zeros(1, 1, 3))

    def forward(self, x):
        return ((self.lin(x) + self.mask_token[0]) ** 2).mean()


def _engine(**kw) -> TorchEngine:
    torch.manual_seed(0)
    spec = EngineSpec(lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), grad_clip=1.0, **kw)
    return TorchEngine(Tiny(), spec, Dist())


def test_param_groups_decay_matrices_only():
    m = Tiny()
    g = param_groups(m, 0.1)
    assert [len(x["params"]) for x in g] == [2, 1]  # lin.weight, mask_token (3-d) | lin.bias
    g = param_groups(m, 0.1, no_decay_names=("mask_token",))
    assert [len(x["params"]) for x in g] == [1, 2] and g[1]["weight_decay"] == 0.0


def test_state_round_trip_continues_identically():
    a = _engine(fused=True)
    x = torch.randn(5, 4)
    for _ in range(3):
        a.backward(a.model(x))
        a.step()
    model_sd, optim = a.state()
    assert set(optim) == {f"{k}/{n}" for k in ("exp_avg", "exp_avg_sq", "step") for n in ("lin.weight", "lin.bias", "mask_token")}
    b = _engine(fused=False)  # a machine without the fused kernel: restores into its own
    b.load_state(model_sd, optim)
    assert not b.optimizer.param_groups[0].get("fused")
    for e in (a, b):
        e.backward(e.model(x))
        e.step()
    for (n, p), q in zip(a.module.named_parameters(), b.module.parameters()):
        assert torch.allclose(p, q, atol=1e-7), n
    assert float(b.optimizer.state[b.module.lin.weight]["step"]) == 4.0


def test_fused_optimizer_keeps_its_step_beside_the_parameters():
    w = torch.nn.Parameter(torch.ones(2, 2))
    m = torch.nn.ParameterDict({"w": w})
    fused = torch.optim.AdamW([w], fused=True)
    load_optimizer_state_by_name(m, fused, {"exp_avg/w": torch.ones(2, 2), "exp_avg_sq/w": torch.ones(2, 2),
                                            "step/w": torch.tensor(3.0)})
    assert float(fused.state[w]["step"]) == 3.0
    assert float(optimizer_state_by_name(m, fused)["step/w"]) == 3.0


def test_non_finite_gradient_is_not_applied_and_loss_guard_names_the_checkpoint():
    e = _engine()
    before = e.module.lin.weight.detach().clone()
    e.backward(e.model(torch.full((2, 4), float("inf"))) * 0 + e.module.lin.weight.sum() * float("inf"))
    with pytest.raises(NonFiniteLossError, match="gradient norm is"):
        e.step()
    assert torch.equal(e.module.lin.weight, before)
    with pytest.raises(NonFiniteLossError, match=r"step 8: loss is nan.*Last good checkpoint: ck/step_5\. Lower lr"):
        check_loss(math.nan, 8, "ck/step_5", hint="Lower lr")
    check_loss(1.0, 8, None)


def test_resolve_engine_falls_back_only_when_deepspeed_is_absent(monkeypatch):
    assert resolve_engine("torch") == "torch" and resolve_engine("deepspeed") == "deepspeed"
    real_import = builtins.__import__

    def fake(error):
        def imp(name, *a, **k):
            if name == "deepspeed":
                raise error
            return real_import(name, *a, **k)
        return imp

    lines: list[str] = []
    monkeypatch.setattr(builtins, "__import__", fake(ModuleNotFoundError("No module named 'deepspeed'")))
    assert resolve_engine("auto", lines.append) == "torch"
    assert "DeepSpeed is not importable" in lines[0]
    monkeypatch.setattr(builtins, "__import__", fake(RuntimeError("CUDA_HOME does not exist")))
    with pytest.raises(RuntimeError, match="CUDA_HOME"):
        resolve_engine("auto", lines.append)


def test_bf16_native_follows_the_cpus_bf16_hardware_and_the_onednn_cap(monkeypatch):
    """bf16-native: bf16 on CUDA and on a CPU with AMX or AVX512-BF16 that oneDNN may use; fp32 on
    any other CPU (emulated bf16 is tens of times slower there). auto, fp32 and bf16 are unchanged."""
    from g3n_train import engine as eng

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for amx, avx512bf16 in ((False, False), (True, False), (False, True)):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda b=avx512bf16: b)
        native = amx or avx512bf16
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
        assert eng.use_bf16("bf16-native", cpu) is native
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # emulating an AVX2-only CPU
        assert eng.use_bf16("bf16-native", cpu) is False
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
        assert eng.use_bf16("bf16-native", cpu) is native
        assert eng.use_bf16("bf16-native", cuda) is True
        assert (eng.use_bf16("auto", cpu), eng.use_bf16("auto", cuda)) == (False, True)
        assert (eng.use_bf16("bf16", cpu), eng.use_bf16("fp32", cuda)) == (True, False)
