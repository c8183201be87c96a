"""DeepSpeed ZeRO-1/2 on CPU with 2 gloo ranks: same losses as ZeRO-0, consolidated checkpoints.

Opt-in (``slow`` + ``deepspeed``; run with ``--runslow``): each case starts real rank processes
and, on a machine whose torch-extension cache is cold, DeepSpeed JIT-compiles its CPU comm op
(~90 s). The ranks run in subprocesses started with the launcher's environment contract (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), exactly what ``deepspeed --num_gpus N`` sets on a
cluster, so DeepSpeed's process group never leaks into the other tests.

What is checked, per stage k in (1, 2):

* the 2-rank ZeRO-k losses equal ZeRO-0's (tolerance: reduction order may differ);
* the checkpoint holds consolidated (full, per-parameter) AdamW moments equal to ZeRO-0's;
* a 2-rank ZeRO-k run stopped at step 2 and resumed gives the uninterrupted run's losses;
* the 2-rank ZeRO-k checkpoint resumes on 1 process (DeepSpeed ZeRO-k and the torch engine)
  and continues exactly as the 1-process resume of the ZeRO-0 checkpoint does.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")

from g3n_dit.checkpoint import load_checkpoint  # noqa: E402

HERE = Path(__file__).resolve().parent

RANK_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    torch.set_num_threads(1)
    sys.path.insert(0, sys.argv[1])
    from dit_testutil import tiny_cfg, toy_set
    from g3n_dit.train import train
    out, stages = sys.argv[2], [int(s) for s in sys.argv[3].split(",")]
    data = toy_set(16)
    result = {}
    for k in stages:
        cfg = tiny_cfg(engine="deepspeed", zero_stage=k, max_steps=4, ckpt_every=2, keep_last=5)
        full = train(cfg, data, f"{out}/z{k}", progress=False)
        part = train(cfg, data, f"{out}/z{k}-resumed", progress=False, stop_after=2)
        rest = train(cfg, data, f"{out}/z{k}-resumed", progress=False)
        result[k] = {"full": full.losses, "part": part.losses, "rest": rest.losses}
    import torch.distributed as dist
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(result), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    """
)

ONE_PROC_SCRIPT = textwrap.dedent(
    """
    import json, shutil, sys, torch
    torch.set_num_threads(1)
    import deepspeed.ops
    # one process needs no shared-memory allreduce: skip (re)building DeepSpeed's shm comm op
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    sys.path.insert(0, sys.argv[1])
    from dit_testutil import tiny_cfg, toy_set
    from g3n_dit.train import train
    out, stages = sys.argv[2], [int(s) for s in sys.argv[3].split(",")]
    data = toy_set(16)
    result = {}
    for k in stages:
        for engine in ("deepspeed", "torch"):
            run = f"{out}/one-z{k}-{engine}"
            shutil.copytree(f"{out}/z{k}", run)
            res = train(tiny_cfg(engine=engine, zero_stage=k), data, run, progress=False, max_steps=6)
            result[f"{k}-{engine}"] = {"step": res.step, "losses": res.losses}
    print("RESULT " + json.dumps(result), flush=True)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _result(stdout: str) -> dict:
    line = next(x for x in stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _launch(world: int, script: str, args: list[str], timeout: float = 900) -> dict:
    """Start ``world`` ranks with the launcher's environment; the result is rank 0's RESULT line."""
    port = str(_free_port())
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-c", script, *args], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, (p, (so, se)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{so[-3000:]}\n{se[-3000:]}"
    return _result(outs[0][0])


def _optim(run: Path, step: int) -> dict[str, torch.Tensor]:
    ck = load_checkpoint(run / "checkpoints" / f"step-{step:08d}")
    assert ck.train is not None
    return {k: v for k, v in ck.train.items() if k.split("/")[0] in ("exp_avg", "exp_avg_sq", "step")}


@pytest.mark.slow
@pytest.mark.deepspeed
def test_zero_stages_match_zero0_and_checkpoints_resume_on_one_process(tmp_path):
    stages = "0,1,2"
    two = _launch(2, RANK_SCRIPT, [str(HERE), str(tmp_path), stages])
    ref = two["0"]["full"]
    assert len(ref) == 4 and all(v == v for v in ref)
    for k in ("0", "1", "2"):
        res = two[k]
        assert res["full"] == pytest.approx(ref, rel=1e-5, abs=1e-6), f"ZeRO-{k} losses differ from ZeRO-0"
        assert res["part"] + res["rest"] == pytest.approx(res["full"], rel=1e-6, abs=1e-7), f"ZeRO-{k} resume"

    # consolidated: every parameter's full moments, equal to ZeRO-0's (whose AdamW is never partitioned)
    ref_opt = _optim(tmp_path / "z0", 4)
    n_params = sum(1 for _ in load_checkpoint(tmp_path / "z0").model)
    assert sum(1 for k in ref_opt if k.startswith("exp_avg/")) == n_params
    for k in ("1", "2"):
        opt = _optim(tmp_path / f"z{k}", 4)
        assert opt.keys() == ref_opt.keys()
        for name in opt:
            assert opt[name].shape == ref_opt[name].shape, name
            assert torch.allclose(opt[name], ref_opt[name], rtol=1e-4, atol=1e-7), (k, name)
        ck, ref_ck = load_checkpoint(tmp_path / f"z{k}"), load_checkpoint(tmp_path / "z0")
        for which in ("model", "ema"):  # ZeRO-2's all-gathered weights feed the EMA every step
            a, b = getattr(ck, which), getattr(ref_ck, which)
            assert a.keys() == b.keys()
            assert all(torch.allclose(a[n], b[n], rtol=1e-4, atol=1e-6) for n in a), (k, which)

    # a checkpoint written by 2 ZeRO-k ranks resumes on 1 process, under DeepSpeed or plain torch
    one = _launch(1, ONE_PROC_SCRIPT, [str(HERE), str(tmp_path), stages])
    base = one["0-torch"]["losses"]
    assert one["0-torch"]["step"] == 6 and len(base) == 2
    for key, res in one.items():
        assert res["step"] == 6
        assert res["losses"] == pytest.approx(base, rel=1e-5, abs=1e-6), key
    ck = load_checkpoint(tmp_path / "one-z2-deepspeed")
    assert ck.step == 6 and float(ck.train["step/x_embed.weight"]) == 6.0


def test_cli_accepts_zero_stages_0_to_2_only():
    from g3n_dit.cli import build_parser

    args = ["train", "--latents", "L", "--out", "R", "--engine", "deepspeed", "--zero-stage"]
    assert build_parser().parse_args([*args, "2"]).zero_stage == 2
    with pytest.raises(SystemExit):
        build_parser().parse_args([*args, "3"])
