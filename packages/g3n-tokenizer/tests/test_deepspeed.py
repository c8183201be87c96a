"""DeepSpeed engine on CPU (one rank, gloo): it gives the torch engine's losses, and a run stopped
after an epoch and resumed gives the same per-step losses as an uninterrupted run, because resume restores the AdamW moments and step
(and, under ZeRO-1, the fp32 master weights) from ``train_state.safetensors``.

Each runs in a subprocess, like g3n-mae's DeepSpeed test, so DeepSpeed's process group and accelerator
choice never leak into the other tests. Marked ``deepspeed`` and ``slow`` (run with ``--runslow``):
DeepSpeed's import and ``initialize`` take tens of seconds on the shared 2-core machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("deepspeed")

#: one DeepSpeed rank on CPU, set up before the test's own code runs
PRELUDE = textwrap.dedent(
    """
    import json, os, sys, torch
    torch.set_num_threads(1)
    import deepspeed.ops
    # one process needs no shared-memory allreduce: skip JIT-compiling DeepSpeed's shm comm op
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    from g3n_mae.launch import free_port
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    """
)


def run_deepspeed(script: str, *args: object) -> dict:
    """Run PRELUDE + ``script`` in a fresh interpreter; return the JSON it prints after ``RESULT ``."""
    proc = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(script), *map(str, args)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


SCRIPT = textwrap.dedent(
    """
    import g3n_shards as gs
    import g3n_tokenizer.train as T
    from g3n_tokenizer.config import preset
    from g3n_tokenizer.mae_cnn import MaeCnnTokenizer

    mae, vols, out = sys.argv[1], sys.argv[2], sys.argv[3]
    ss = gs.ShardSet.open(vols)
    steps = []
    plain_step = T.train_step
    def recording_step(engine, tok, x):
        loss = plain_step(engine, tok, x)
        assert engine.name == "deepspeed"
        steps.append(loss)
        return loss
    T.train_step = recording_step

    def run(stage, epochs, run_dir, resume=False):
        steps.clear()
        torch.manual_seed(0)
        cfg = preset("test", train={"max_epochs": epochs, "steps_per_epoch": 2, "engine": "deepspeed",
                                    "zero_stage": stage, "patience": 10})
        tok = MaeCnnTokenizer.from_mae(mae, cfg.mae_cnn)  # fresh init: resume must overwrite it all
        res = T.train_tokenizer(tok, ss, cfg.train, run_dir, resume=resume, progress=False)
        return {"steps": list(steps), "val": [h["val_loss"] for h in res.history]}

    result = {}
    for stage in (0, 1):
        full = run(stage, 3, f"{out}/z{stage}-full")
        part = run(stage, 1, f"{out}/z{stage}-part")
        rest = run(stage, 3, f"{out}/z{stage}-part", resume=True)
        result[f"z{stage}"] = {"full": full, "part": part, "rest": rest}
    print("RESULT " + json.dumps(result))
    """
)


@pytest.mark.deepspeed
@pytest.mark.slow
def test_deepspeed_resume_continues_exactly(tmp_path, mae_checkpoint, volumes_set):
    results = run_deepspeed(SCRIPT, mae_checkpoint, volumes_set, tmp_path)
    from safetensors import safe_open

    for name, res in results.items():
        full, part, rest = res["full"], res["part"], res["rest"]
        assert len(full["steps"]) == 6 and all(v == v for v in full["steps"]), name
        assert len(part["steps"]) == 2 and len(rest["steps"]) == 4, name
        assert part["steps"] + rest["steps"] == pytest.approx(full["steps"], rel=1e-6, abs=1e-7), name
        assert rest["val"] == pytest.approx(full["val"], rel=1e-6, abs=1e-7), name  # history: 1 loaded + 2 new
        # the optimizer state is plain safetensors: moments and step for every trainable parameter
        run = tmp_path / f"{name}-full"
        with safe_open(str(run / "train_state.safetensors"), framework="pt", device="cpu") as f:
            keys = set(f.keys())
            steps = {float(f.get_tensor(k)) for k in keys if k.startswith("step/")}
        names = {k.split("/", 1)[1] for k in keys if k.startswith("exp_avg/")}
        assert names and {k.split("/", 1)[1] for k in keys if k.startswith("exp_avg_sq/")} == names, name
        assert steps == {6.0}, (name, steps)
        assert not list(run.glob("*.tmp")), name  # atomic writes leave no temporaries


DEEPSPEED_VS_TORCH = """
    import g3n_shards as gs
    from g3n_tokenizer.config import preset
    from g3n_tokenizer.mae_cnn import MaeCnnTokenizer
    from g3n_tokenizer.train import train_tokenizer

    mae, vols, out = sys.argv[1], sys.argv[2], sys.argv[3]
    ss = gs.ShardSet.open(vols)
    result = {}
    for engine in ("torch", "deepspeed"):
        torch.manual_seed(0)
        cfg = preset("test", train={"max_epochs": 2, "steps_per_epoch": 2, "engine": engine})
        tok = MaeCnnTokenizer.from_mae(mae, cfg.mae_cnn)
        res = train_tokenizer(tok, ss, cfg.train, f"{out}/{engine}", progress=False)
        result[engine] = [h["val_loss"] for h in res.history]
    print("RESULT " + json.dumps(result))
"""


@pytest.mark.deepspeed
@pytest.mark.slow
def test_deepspeed_engine_matches_torch(tmp_path, mae_checkpoint, volumes_set):
    """The DeepSpeed engine gives the torch engine's validation losses."""
    out = run_deepspeed(DEEPSPEED_VS_TORCH, mae_checkpoint, volumes_set, tmp_path)
    assert len(out["torch"]) == 2
    assert out["torch"] == pytest.approx(out["deepspeed"], rel=1e-4)
