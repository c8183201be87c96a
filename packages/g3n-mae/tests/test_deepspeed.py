"""The one DeepSpeed test: the same loop through ``deepspeed.initialize`` on CPU (gloo, ZeRO-1).

Runs in a subprocess so DeepSpeed's process group and accelerator choice never leak into the
other tests. A 2-rank ZeRO-1 run through the ``deepspeed`` launcher was checked by hand to give
checkpoints bit-identical to the 2-process torch DDP path (weights and AdamW moments). It checks: training runs, the checkpoint is plain (loads without DeepSpeed), and
resuming on DeepSpeed continues with the same losses as the uninterrupted DeepSpeed run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("deepspeed")

SCRIPT = textwrap.dedent(
    """
    import json, os, sys, torch
    torch.set_num_threads(1)
    from g3n_mae.config import preset
    from g3n_mae.data import InMemoryVolumes, brain_like_volumes
    from g3n_mae.launch import free_port
    from g3n_mae.train import train
    import deepspeed.ops
    # one process needs no shared-memory allreduce: skip JIT-compiling DeepSpeed's shm comm op
    # (~90 s, and rebuilt whenever the build environment differs), the loop under test is unchanged
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    out = sys.argv[1]
    src = InMemoryVolumes(brain_like_volumes(6, (32, 32, 32), seed=2))
    result = {}
    # ZeRO-1 fp32 (partitioned optimizer) and ZeRO-0 bf16 (DeepSpeed's unfused bf16 optimizer, fp32 masters)
    for name, stage, precision in (("z1", 1, "fp32"), ("z0bf16", 0, "bf16")):
        cfg = preset("test", train=dict(engine="deepspeed", zero_stage=stage, precision=precision, total_steps=6,
                                        ckpt_every=3, log_every=1000, deterministic=True, batch_size=2))
        full = train(cfg, src, f"{out}/{name}-full", log=lambda s: None)
        part = train(cfg, src, f"{out}/{name}-part", stop_at=3, log=lambda s: None)
        rest = train(cfg, src, f"{out}/{name}-part", resume=True, log=lambda s: None)
        result[name] = {"full": full.losses, "part": part.losses, "rest": rest.losses}
    print("RESULT " + json.dumps(result))
    """
)


@pytest.mark.deepspeed
def test_deepspeed_engine_trains_checkpoints_and_resumes(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    results = json.loads(line[len("RESULT "):])
    from g3n_mae.checkpoint import load_checkpoint, load_model

    for name, res in results.items():
        full = [v for _, v in res["full"]]
        assert len(full) == 6 and all(v == v for v in full), name
        assert [v for _, v in res["part"] + res["rest"]] == pytest.approx(full, rel=1e-6, abs=1e-7), name
        model_sd, optim, state = load_checkpoint(tmp_path / f"{name}-full/checkpoints/step_00000006")
        assert state["engine"] == "deepspeed"
        n_params = sum(1 for k in optim if k.startswith("exp_avg/"))
        assert n_params == sum(1 for k in model_sd if not k.endswith("pos_embed")), name  # every parameter's moments
        assert all(v.dtype == torch.float32 for v in model_sd.values())
        model, cfg, _ = load_model(tmp_path / f"{name}-full")  # plain safetensors, no DeepSpeed needed
        assert cfg.embed_dim == 48
