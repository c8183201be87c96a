"""DeepSpeed ZeRO-1/2/3 on CPU with 2 gloo processes: same losses as ZeRO-0, consolidated checkpoints.

Opt-in (``slow`` + ``deepspeed``; run with ``--runslow``): it starts 2-process runs for four
stages, and on a machine whose torch-extension cache is cold DeepSpeed first JIT-compiles its
CPU comm op (~90 s). Everything runs in a subprocess so DeepSpeed's process group and
accelerator choice never leak into the other tests; the ranks come from
:func:`g3n_mae.launch.run_local`, which sets the same environment as the ``deepspeed`` launcher.

Per stage k in (1, 2, 3) it checks:

* the 2-process ZeRO-k losses equal ZeRO-0's (tolerance: reduction order may differ);
* the step-4 checkpoint holds full fp32 weights and full AdamW moments for every parameter,
  equal to ZeRO-0's (consolidated from the per-rank partitions);
* resuming the step-2 checkpoint on 2 processes reproduces the uninterrupted run's steps 3-4;
* the 2-process checkpoint resumes on 1 process (DeepSpeed ZeRO-k and the torch engine) and
  continues exactly like the 1-process resume of the ZeRO-0 checkpoint.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("deepspeed")

STAGES = (0, 1, 2, 3)

SCRIPT = textwrap.dedent(
    """
    import json, os, shutil, sys, torch
    torch.set_num_threads(1)
    from g3n_mae.config import preset
    from g3n_mae.launch import SourceSpec, free_port, run_local
    from g3n_mae.train import train
    out, stages = sys.argv[1], [int(s) for s in sys.argv[2].split(",")]
    spec = SourceSpec(synthetic=8, synthetic_seed=1)

    def cfg(stage, engine="deepspeed", total=4):
        # warm-up 4 for both lengths: a resume may lengthen the run, not change its schedule
        return preset("test", train=dict(engine=engine, zero_stage=stage, precision="fp32", total_steps=total, warmup_steps=4,
                                         ckpt_every=2, keep_last=5, log_every=1, deterministic=False, batch_size=2))

    def losses(run):
        return [json.loads(line)["loss"] for line in open(f"{run}/metrics.jsonl")]

    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])  # import torch._dynamo once, before forking
    result = {}
    for k in stages:
        run_local(2, cfg(k), spec, f"{out}/z{k}", start_method="fork")
        # same topology: resume the step-2 checkpoint in a fresh run dir
        os.makedirs(f"{out}/z{k}-resumed/checkpoints")
        shutil.copytree(f"{out}/z{k}/checkpoints/step_00000002", f"{out}/z{k}-resumed/checkpoints/step_00000002")
        run_local(2, cfg(k), spec, f"{out}/z{k}-resumed", resume=True, start_method="fork")
        result[k] = {"full": losses(f"{out}/z{k}"), "resumed": losses(f"{out}/z{k}-resumed")}

    # 2 -> 1 process: resume each stage's step-4 checkpoint on this process
    import deepspeed.ops
    # one process needs no shared-memory allreduce: skip (re)building DeepSpeed's shm comm op
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    for k in stages:
        for engine in ("deepspeed", "torch"):
            run = f"{out}/one-z{k}-{engine}"
            shutil.copytree(f"{out}/z{k}/checkpoints", f"{run}/checkpoints")
            res = train(cfg(k, engine, total=6), spec.open((32, 32, 32)), run, resume=True, log=lambda s: None)
            result[f"{k}-{engine}"] = res.losses
    print("RESULT " + json.dumps(result))
    """
)


@pytest.mark.slow
@pytest.mark.deepspeed
def test_zero_stages_match_zero0_and_checkpoints_resume_on_one_process(tmp_path):
    from g3n_mae.checkpoint import load_checkpoint, load_model

    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), ",".join(map(str, STAGES))],
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    res = json.loads(line[len("RESULT "):])

    ref = res["0"]["full"]
    assert len(ref) == 4 and all(v == v for v in ref)
    ref_sd, ref_opt, _ = load_checkpoint(tmp_path / "z0/checkpoints/step_00000004")
    for k in STAGES:
        assert res[str(k)]["full"] == pytest.approx(ref, rel=1e-5, abs=1e-6), f"ZeRO-{k} losses differ from ZeRO-0"
        assert res[str(k)]["resumed"] == pytest.approx(ref[2:], rel=1e-6, abs=1e-7), f"ZeRO-{k} resume"
        model_sd, optim, state = load_checkpoint(tmp_path / f"z{k}/checkpoints/step_00000004")
        assert state["world_size"] == 2 and state["engine"] == "deepspeed"
        assert model_sd.keys() == ref_sd.keys() and optim.keys() == ref_opt.keys(), k
        assert sum(1 for n in optim if n.startswith("exp_avg/")) == sum(1 for n in model_sd if not n.endswith("pos_embed"))
        for name, v in model_sd.items():
            assert v.dtype == torch.float32 and v.shape == ref_sd[name].shape, (k, name)
            assert torch.allclose(v, ref_sd[name], rtol=1e-4, atol=1e-5), (k, name)
        for name, v in optim.items():
            assert v.shape == ref_opt[name].shape, (k, name)
            assert torch.allclose(v, ref_opt[name], rtol=1e-3, atol=1e-8), (k, name)
        assert float(optim["step/blocks.0.fc1.weight"]) == 4.0
        load_model(tmp_path / f"z{k}")  # plain safetensors, no DeepSpeed needed

    base = res["0-torch"]
    assert [s for s, _ in base] == [5, 6]
    for k in STAGES:
        for engine in ("deepspeed", "torch"):
            got = res[f"{k}-{engine}"]
            assert [s for s, _ in got] == [5, 6], (k, engine)
            assert [v for _, v in got] == pytest.approx([v for _, v in base], rel=1e-5, abs=1e-6), (k, engine)
    _, optim, state = load_checkpoint(tmp_path / "one-z3-deepspeed/checkpoints/step_00000006")
    assert state["world_size"] == 1 and float(optim["step/blocks.0.fc1.weight"]) == 6.0
