"""The cluster configuration: paper-preset YAMLs, hostfile, the chain script, URL shard locations.

These tests keep the cluster path from rotting silently: each stage YAML must validate against
that stage's own config model and still state the paper's numbers, and every ``g3n-*``
subcommand and flag the chain script uses must exist in that stage's parser.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import g3n_shards as gs
from g3n_pipeline import cluster

ROOT = Path(__file__).resolve().parents[3]
PAPER = ROOT / "configs" / "paper"
SCRIPT = ROOT / "tools" / "cluster" / "paper_chain.sh"
OBJCAT = ROOT / "tools" / "cluster" / "objcat"


# ---- stage YAMLs at the paper presets -------------------------------------------------------
def test_data_yaml_is_the_paper_preprocessing():
    from g3n_data.config import load_config, make_config

    cfg = load_config(PAPER / "data.yaml")
    assert cfg.geometry.shape == (160, 192, 160) and cfg.geometry.spacing == 1.0
    assert cfg.geometry.patch_size == (16, 16, 16) and cfg.atlas.name == "SRI24"
    assert cfg.n4.enabled and cfg.registration.enabled and cfg.clip_negative
    assert cfg.skullstrip.method == "hdbet"  # the paper's stripper
    paper = make_config("paper")
    assert cfg.geometry == paper.geometry and cfg.registration == paper.registration


def test_mae_yaml_is_the_paper_model():
    from g3n_mae.config import load_config

    cfg = load_config(PAPER / "mae.yaml")
    m = cfg.model
    assert m.img_size == (160, 192, 160) and m.patch_size == (16, 16, 16)
    assert m.grid_size == (10, 12, 10) and m.num_patches == 1200 and m.num_visible == 360
    assert (m.embed_dim, m.depth, m.num_heads, m.mlp_dim) == (1152, 12, 16, 4608)
    assert (m.decoder_depth, m.decoder_embed_dim, m.decoder_num_heads) == (8, 512, 16)
    assert m.mask_ratio == 0.70
    assert cfg.train.engine == "deepspeed" and cfg.train.zero_stage in (1, 2) and cfg.train.precision == "bf16"


def test_tokenizer_yaml_is_the_paper_tokenizer():
    from g3n_tokenizer.config import check_patch_factor, load_config

    cfg = load_config(PAPER / "tokenizer.yaml")
    assert cfg.tokenizer == "mae-cnn" and cfg.mae_cnn.c == 32
    assert 1200 * cfg.mae_cnn.c == 38_400
    check_patch_factor(cfg.mae_cnn.decoder, (16, 16, 16))  # the decoder upsamples one token to a 16^3 patch
    assert (cfg.train.max_epochs, cfg.train.patience) == (80, 40)
    assert cfg.train.engine == "deepspeed"


def test_dit_yaml_is_the_paper_dit():
    from g3n_dit.config import load_run_config

    cfg = load_run_config(PAPER / "dit.yaml", "tiny", "generation")  # the file's own preset wins
    m = cfg.model
    assert m.grid == (10, 12, 10) and m.num_tokens == 1200 and m.channels == 32
    assert (m.depth, m.hidden, m.heads) == (12, 1024, 16)
    names = {c.name: c for c in cfg.conditions}
    assert set(names) == {"disease", "sex", "modality", "site", "age", "idh1"}
    assert names["modality"].drop_prob == 0.0 and names["disease"].drop_prob == 0.1
    assert cfg.train.engine == "deepspeed" and cfg.train.ema_decay == 0.9999


def test_probe_yaml_is_the_paper_protocol():
    from g3n_probe.config import load_protocol

    cfg = load_protocol(PAPER / "probe.yaml")
    assert (cfg.n_splits, cfg.seed, cfg.logreg_max_iter) == (5, 2025, 1000)


def test_sample_requests_parse():
    import json

    from g3n_dit.generate import GenerationRequest

    lines = [json.loads(line) for line in (PAPER / "sample_requests.jsonl").read_text().splitlines() if line.strip()]
    reqs = [GenerationRequest(conditions=dict(d["conditions"]), n=int(d["n"])) for d in lines]
    assert all(r.n == 64 for r in reqs)
    assert {r.conditions.get("age") for r in reqs} >= {30, 50, 70}


def test_yaml_typo_is_refused(tmp_path):
    from g3n_mae.config import ConfigError, load_config

    bad = tmp_path / "mae.yaml"
    bad.write_text((PAPER / "mae.yaml").read_text().replace("mlp_dim:", "mlp_dimm:"))
    with pytest.raises(ConfigError, match="mlp_dimm"):
        load_config(bad)


# ---- hostfile and the chain script ----------------------------------------------------------
def test_hostfile_example_parses(tmp_path):
    hosts = cluster.parse_hostfile(ROOT / "configs" / "cluster" / "hostfile.example")
    assert len(hosts) >= 2 and all(s >= 1 for s in hosts.values())
    bad = tmp_path / "hostfile"
    bad.write_text("node1 slots=4\nnode2 gpus=4\n")
    with pytest.raises(cluster.HostfileError, match=r"hostfile:2"):
        cluster.parse_hostfile(bad)


def test_no_deepspeed_json_is_shipped():
    # the stages take the ZeRO stage from their YAMLs (train.zero_stage) and build the DeepSpeed
    # config themselves; a JSON beside them would be read by nothing.
    assert not list((ROOT / "configs").rglob("*.json"))


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_script_is_valid_bash():
    for script in (SCRIPT, OBJCAT):
        r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert os.access(script, os.X_OK), f"{script} is not executable"


def test_script_usage_without_a_step(tmp_path):
    r = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "G3N_RUN": str(tmp_path)})
    assert r.returncode == 2 and "Steps, in order" in r.stderr


def test_every_stage_command_and_flag_in_the_script_exists():
    calls = cluster.script_invocations(SCRIPT)
    used = {(c.command, c.subcommand) for c in calls}
    # the whole chain is there
    for need in [("g3n-data", "ingest"), ("g3n-data", "preprocess"), ("g3n-data", "split"), ("g3n-mae", "train"),
                 ("g3n-mae", "encode"), ("g3n-tokenizer", "train"), ("g3n-tokenizer", "encode"), ("g3n-dit", "train"),
                 ("g3n-dit", "sample"), ("g3n-probe", "run"), ("g3n-eval", "report")]:
        assert need in used, f"the chain script does not run {need}"
    assert cluster.check_invocations(calls) == []
    preprocess = [c for c in calls if c.subcommand == "preprocess"]
    assert any("--part" in c.flags for c in preprocess) and any("--merge" in c.flags for c in preprocess)


def test_the_flag_check_can_fail(tmp_path):
    s = tmp_path / "s.sh"
    s.write_text('#!/bin/bash\nX=(--no-such-array-flag)\ng3n-mae train --data d \\\n  --run-dir r --no-such-flag "${X[@]}"\n'
                 "g3n-probe fly --out o\n# g3n-mae comment --ignored\n")
    problems = cluster.check_invocations(cluster.script_invocations(s))
    assert any("--no-such-flag" in p and "line 3" in p for p in problems)
    assert any("--no-such-array-flag" in p for p in problems)
    assert any("no subcommand 'fly'" in p for p in problems)
    assert not any("--ignored" in p for p in problems)


def test_deepspeed_launcher_flags_exist():
    runner = pytest.importorskip("deepspeed.launcher.runner")
    line = next(line for _, line in cluster.logical_lines(SCRIPT.read_text()) if line.strip().startswith("deepspeed "))
    flags = {f for f in line.split() if f.startswith("--")}
    assert {"--hostfile", "--num_nodes", "--num_gpus", "--no_local_rank"} <= flags
    grabbed: dict[str, argparse.ArgumentParser] = {}
    orig = argparse.ArgumentParser.parse_args

    def grab(self, args=None, namespace=None):
        grabbed["p"] = self
        return orig(self, ["script.py"], namespace)

    argparse.ArgumentParser.parse_args = grab
    try:
        runner.parse_args()
    finally:
        argparse.ArgumentParser.parse_args = orig
    known = {s for a in grabbed["p"]._actions for s in a.option_strings}
    assert flags <= known, flags - known


# ---- shards through WebDataset URL locations ------------------------------------------------
@pytest.fixture()
def small_set(tmp_path) -> Path:
    out = tmp_path / "bucket" / "volumes"
    rng = np.random.default_rng(0)
    with gs.ShardWriter(out, kind="volumes", producer=gs.Producer(package="g3n-pipeline-tests"),
                        geometry=gs.Geometry(shape=(8, 8, 8), spacing=(2.0, 2.0, 2.0), patch_size=(4, 4, 4)),
                        max_shard_samples=2) as w:
        for i in range(5):
            meta = gs.SampleMeta(subject=f"s{i}", modality="T1", cohort="url")
            w.write(gs.sample_key(meta), meta, {"volume": rng.random((8, 8, 8)).astype(np.float32)})
    return out


def _read(location: str) -> dict[str, np.ndarray]:
    ss = gs.ShardSet.open(location, kind="volumes")
    return {s.key: s.arrays["volume"] for s in ss.iter_split(rank=0, world_size=1, shuffle=False)}


def test_shard_set_opens_through_url_locations(small_set, tmp_path):
    local = _read(str(small_set))
    assert len(local) == 5 and len(gs.ShardSet.open(small_set).manifest.shards) == 3
    for location in (f"pipe:cat {small_set}", f"file://{small_set}", f"pipe:{OBJCAT} {small_set}"):
        got = _read(location)
        assert list(got) == list(local), location
        for k in local:
            np.testing.assert_array_equal(got[k], local[k])
    # ranks split the URL set's shards: every sample exactly once
    ss = gs.ShardSet.open(f"pipe:cat {small_set}")
    seen = [s.key for r in range(3) for s in ss.iter_split(rank=r, world_size=3, shuffle=True, seed=1)]
    assert sorted(seen) == sorted(local)
    # a tampered shard is caught through the URL path too
    shard = next(small_set.glob("*.tar"))
    shard.write_bytes(shard.read_bytes()[:-512])
    with pytest.raises(gs.ShardError, match="truncated"):
        _read(f"pipe:cat {small_set}")


def test_object_storage_location_through_objcat(small_set, tmp_path, monkeypatch):
    """``pipe:objcat s3://bucket/set`` with a stand-in ``aws`` that serves a local folder as the bucket,
    also after pathlib has collapsed ``s3://`` to ``s3:/`` (CLIs that parse --data as a Path)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "aws"
    bucket_root = small_set.parent.parent  # .../bucket/volumes -> s3://bucket/volumes
    fake.write_text('#!/bin/sh\n# aws s3 cp --quiet s3://BUCKET/KEY -\ncase "$4" in s3://*) ;; *) exit 9;; esac\n'
                    f'exec cat "{bucket_root}/${{4#s3://}}"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    want = _read(str(small_set))
    for location in (f"pipe:{OBJCAT} s3://bucket/volumes", str(Path(f"pipe:{OBJCAT} s3://bucket/volumes"))):
        assert "s3:/" in location
        assert list(_read(location)) == list(want)
    with pytest.raises(gs.ShardError):
        gs.ShardSet.open(f"pipe:{OBJCAT} s3://bucket/no-such-set")


# ---- the script's own logic, with every stage and the launcher replaced by stubs -------------
_STUB = """#!/bin/sh
echo "$(basename "$0") $*" >> "$STUB_LOG"
out=""; prev=""
for a in "$@"; do [ "$prev" = "--out" ] && out=$a; prev=$a; done
case "$1" in
  ingest) mkdir -p "$out" && : > "$out/worklist.jsonl" ;;
  split) echo '{"keys": {"train": ["k1"], "val": [], "test": ["k2"]}}' > "$out" ;;
esac
"""


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_script_runs_the_chain_in_order_with_stubs(tmp_path):
    import sys

    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name in ("g3n-data", "g3n-mae", "g3n-tokenizer", "g3n-dit", "g3n-probe", "g3n-eval", "g3n-shards", "deepspeed"):
        (stubs / name).write_text(_STUB)
        (stubs / name).chmod(0o755)
    run, log = tmp_path / "run", tmp_path / "calls.log"
    env = {**os.environ, "PATH": f"{stubs}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "STUB_LOG": str(log), "G3N_RUN": str(run), "G3N_SOURCES": "bids:/data/v1.2/ADNI csv:/data/IXI/ixi.csv",
           "G3N_PARTS": "2", "G3N_NUM_NODES": "2", "G3N_HOSTFILE": str(ROOT / "configs/cluster/hostfile.example")}
    env.pop("MASTER_ADDR", None)
    r = subprocess.run(["bash", str(SCRIPT), "all"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    calls = log.read_text().splitlines()
    order = [" ".join(c.split()[:2]) for c in calls]
    assert order[:2] == ["g3n-data ingest", "g3n-data ingest"]
    parts = [c for c in calls if c.startswith("g3n-data preprocess") and "--part" in c]
    assert len(parts) == 4 and {c.split("--part ")[1].split()[0] for c in parts} == {"1/2", "2/2"}
    assert any("/ingest/ADNI/worklist.jsonl" in c for c in parts) and any("/ingest/ixi/worklist.jsonl" in c for c in parts)
    ds = [c for c in calls if c.startswith("deepspeed")]
    assert len(ds) == 3
    for c, stage in zip(ds, ("g3n-mae train", "g3n-tokenizer train", "g3n-dit train")):
        assert f"{stubs}/{stage}" in c, c
        assert "--num_nodes 2" in c and "--master_addr gpu-node-01" in c and "--no_local_rank" in c
        assert "--resume" not in c
    assert f"--data {run}/volumes-train" in ds[0] and "--config configs/paper/mae.yaml" in ds[0]
    subsets = [c for c in calls if c.startswith("g3n-shards subset")]
    assert len(subsets) == 4 and (run / "keys-train.json").read_text().strip() == '["k1"]'
    assert order.index("g3n-mae export") < order.index("g3n-mae encode") < order.index("g3n-tokenizer encode")
    assert order[-1] == "g3n-eval report"

    # after a preemption: a checkpoint exists, so the re-submitted step resumes; done sets are skipped
    (run / "mae" / "checkpoints").mkdir(parents=True)
    (run / "mae" / "checkpoints" / "latest.json").write_text("{}")
    (run / "tokens").mkdir()
    (run / "tokens" / "manifest.json").write_text("{}")
    log.unlink()
    for step in ("mae", "encode"):
        r = subprocess.run(["bash", str(SCRIPT), step], cwd=ROOT, env={**env, "G3N_STOP_AT": "300"},
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    calls = log.read_text().splitlines()
    assert "--resume" in calls[0] and "--stop-at 300" in calls[0]
    assert [c.split()[1] for c in calls[1:]] == ["export"]  # the tokens set is complete: no encode
