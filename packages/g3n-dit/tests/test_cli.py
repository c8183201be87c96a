"""End to end through shard sets and the CLI: train, sample, counterfactual, longitudinal, forecast."""

from __future__ import annotations

import json

import g3n_shards as gs
import numpy as np
import pytest
import yaml

from g3n_dit.cli import main

TRAIN_YAML = {"train": {"batch_size": 8, "max_steps": 4, "warmup_steps": 1, "log_every": 2, "ckpt_every": 2,
                        "ema_decay": 0.9}}  # fmt: skip


def write_latents(path, sessions: int = 1, n_subjects: int = 12, bad: int = 0, no_age: int = 0, channels: int = 4):
    rng = np.random.default_rng(0)
    with gs.ShardWriter(path, kind="latents", producer=gs.Producer(package="g3n-dit-tests"),
                        geometry=gs.Geometry(shape=(32, 32, 32), patch_size=(8, 8, 8), channels=channels),
                        tokenizer=gs.ModelRef(name="toy-tokenizer", checkpoint_digest="sha256:" + "0" * 64),
                        max_shard_samples=5) as w:  # fmt: skip
        for i in range(n_subjects):
            for s in range(sessions):
                meta = gs.SampleMeta(subject=f"sub-{i:02d}", session=f"ses-{s}", cohort="TOY", site=f"site{i % 2}",
                                     modality="T1", age=60.0 + i + 1.5 * s, sex="M" if i % 2 else "F",
                                     diagnosis=["HC", "MCI", "AD"][i % 3], cdr=[0.0, 0.5, 1.0][i % 3],
                                     idh1="wildtype" if i == 0 else None)  # fmt: skip
                x = rng.normal(size=(64, channels)).astype(np.float32) + 0.2 * s
                w.write(gs.sample_key(meta), meta, {"latent": x})
        for b in range(no_age):
            meta = gs.SampleMeta(subject=f"noage-{b}", modality="T1", sex="F", diagnosis="HC")
            w.write(gs.sample_key(meta), meta, {"latent": rng.normal(size=(64, 4)).astype(np.float32)})
        for b in range(bad):
            meta = gs.SampleMeta(subject=f"bad-{b}", modality="T1", age=50.0)
            w.write(gs.sample_key(meta), meta, {"latent": np.zeros((63, 4), np.float32)})
    return gs.ShardSet.open(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    write_latents(root / "lat", bad=1, no_age=1)
    (root / "cfg.yaml").write_text(yaml.safe_dump(TRAIN_YAML))
    rc = main(["train", "--latents", str(root / "lat"), "--out", str(root / "run"), "--config", str(root / "cfg.yaml"),
               "--quiet", "--device", "cpu"])  # fmt: skip
    assert rc == 0
    return root


def test_train_writes_checkpoints_and_rejects(trained):
    run = trained / "run"
    assert (run / "checkpoints" / "step-00000004" / "ema.safetensors").is_file()
    rej = [json.loads(x) for x in (run / "rejects.jsonl").read_text().splitlines()]
    assert len(rej) == 1 and "63 tokens" in rej[0]["reason"]
    assert main(["info", str(run)]) == 0


def test_sample_writes_marked_synthetic_latents(trained, capsys):
    out = trained / "syn"
    rc = main(["sample", "--checkpoint", str(trained / "run"), "--out", str(out), "--n", "3", "--steps", "3",
               "--condition", "disease=AD", "--condition", "modality=T1", "--condition", "age=71.5",
               "--guidance-for", "disease=2.0", "--seed", "5", "--quiet", "--device", "cpu"])  # fmt: skip
    assert rc == 0
    ss = gs.ShardSet.open(out, kind="latents")
    assert len(ss) == 3
    assert ss.manifest.tokenizer.name == "toy-tokenizer" and ss.manifest.generator.name == "g3n-dit"
    assert ss.manifest.geometry.token_grid == (4, 4, 4)
    samples = list(ss)
    m = samples[0].meta
    assert m.synthetic and m.diagnosis == "AD" and m.age == 71.5 and m.sex is None
    r = m.request
    assert r["sampler"] == "euler" and r["steps"] == 3 and r["precision"] == "fp32"
    assert r["guidance"]["disease"] == 2.0 and r["guidance"]["sex"] == 1.5 and "modality" not in r["guidance"]
    assert r["checkpoint"]["digest"].startswith("sha256:") and r["conditions"]["disease"] == "AD"
    assert sorted(s.meta.request["seed"] for s in samples) == [5, 6, 7]
    assert samples[0].arrays["latent"].shape == (64, 4)
    # reproducible: the same request and seeds give the same latents
    rc = main(["sample", "--checkpoint", str(trained / "run"), "--out", str(trained / "syn2"), "--n", "3", "--steps", "3",
               "--condition", "disease=AD", "--condition", "modality=T1", "--condition", "age=71.5",
               "--guidance-for", "disease=2.0", "--seed", "5", "--quiet", "--device", "cpu", "--batch-size", "2"])  # fmt: skip
    assert rc == 0
    a = {s.key: s.arrays["latent"] for s in ss}
    b = {s.key: s.arrays["latent"] for s in gs.ShardSet.open(trained / "syn2")}
    assert a.keys() == b.keys() and all(np.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_sample_from_a_requests_file(trained):
    reqs = trained / "requests.jsonl"
    reqs.write_text(json.dumps({"conditions": {"disease": "HC", "modality": "T1", "sex": "F"}, "n": 2}) + "\n"
                    + json.dumps({"conditions": {"disease": "MCI", "modality": "T1", "age": 80}}) + "\n")  # fmt: skip
    rc = main(["sample", "--checkpoint", str(trained / "run"), "--out", str(trained / "synr"), "--requests", str(reqs),
               "--steps", "2", "--sampler", "heun", "--quiet", "--device", "cpu"])  # fmt: skip
    assert rc == 0
    metas = sorted((s.meta for s in gs.ShardSet.open(trained / "synr")), key=lambda m: m.request["seed"])
    assert [(m.diagnosis, m.sex, m.age) for m in metas] == [("HC", "F", None), ("HC", "F", None), ("MCI", None, 80.0)]
    assert all(m.request["sampler"] == "heun" for m in metas)


def test_paired_sampling_gives_every_request_the_same_noise(trained):
    """--paired: sample j of each request starts from seed + j, so two requests that differ only
    in one condition differ only through it: identical requests give identical latents. (This
    barely trained net hardly reacts to the condition; test_train checks that it moves samples.)"""
    reqs = trained / "paired.jsonl"
    reqs.write_text("".join(json.dumps({"conditions": c, "n": 3}) + "\n" for c in (
        {"disease": "HC", "modality": "T1"}, {"disease": "AD", "modality": "T1"}, {"disease": "HC", "modality": "T1"})))
    rc = main(["sample", "--checkpoint", str(trained / "run"), "--out", str(trained / "pair"), "--requests", str(reqs),
               "--steps", "3", "--seed", "11", "--paired", "--quiet", "--device", "cpu"])  # fmt: skip
    assert rc == 0
    samples = list(gs.ShardSet.open(trained / "pair"))
    assert len(samples) == 9 and len({s.meta.subject for s in samples}) == 9  # keys stay distinct
    by = {}
    for s in samples:
        assert s.meta.request["paired"] is True
        by.setdefault((s.meta.diagnosis, s.meta.request["seed"]), []).append(s.arrays["latent"])
    assert sorted({seed for _, seed in by}) == [11, 12, 13]
    for seed in (11, 12, 13):
        hc_a, hc_b = by[("HC", seed)]
        assert np.allclose(hc_a, hc_b, atol=1e-5)  # same noise, same request: the same latent
    assert not np.allclose(by[("HC", 11)][0], by[("HC", 12)][0], atol=1e-3)


def test_sample_refuses_bad_requests(trained, capsys):
    args = ["sample", "--checkpoint", str(trained / "run"), "--out", str(trained / "x"), "--n", "1", "--quiet"]
    assert main(args + ["--condition", "disease=XYZ", "--condition", "modality=T1"]) == 2
    assert "XYZ" in capsys.readouterr().err
    assert main(args + ["--condition", "diseas=AD", "--condition", "modality=T1"]) == 2
    assert "unknown condition" in capsys.readouterr().err
    assert main(args + ["--condition", "disease=AD"]) == 2
    assert "modality" in capsys.readouterr().err
    assert main(args + ["--condition", "disease=AD", "--condition", "modality=T1", "--guidance-for", "modality=2"]) == 2
    assert "cannot be guided" in capsys.readouterr().err
    assert main(args + ["--condition", "age=abc", "--condition", "modality=T1"]) == 2
    assert "not a number" in capsys.readouterr().err


def test_counterfactual_cli(trained):
    out = trained / "cf"
    rc = main(["counterfactual", "--checkpoint", str(trained / "run"), "--latents", str(trained / "lat"),
               "--out", str(out), "--keys", "toy-sub-00-ses-0-t1", "--set", "disease=AD", "--set", "age=+10",
               "--steps", "3", "--quiet", "--device", "cpu"])  # fmt: skip
    assert rc == 0
    (s,) = list(gs.ShardSet.open(out))
    assert s.meta.subject == "sub-00" and s.meta.diagnosis == "AD" and s.meta.age == 70.0 and s.meta.synthetic
    assert s.meta.request["original"]["disease"] == "HC" and s.meta.request["source"]["key"] == "toy-sub-00-ses-0-t1"
    # over the whole set: the wrong-shape latent and the one without an age (age +10) are refused, the rest done
    rc = main(["counterfactual", "--checkpoint", str(trained / "run"), "--latents", str(trained / "lat"),
               "--out", str(trained / "cf_all"), "--set", "age=+10", "--steps", "2", "--quiet", "--device", "cpu"])  # fmt: skip
    assert rc == 0
    assert len(gs.ShardSet.open(trained / "cf_all")) == 12
    rej = [json.loads(x) for x in (trained / "cf_all" / "rejects.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in rej) == ["counterfactual", "load-latents"]
    assert any("relative change" in r["reason"] for r in rej)
    # a change naming an unknown label is the user's error: nothing is written
    assert main(["counterfactual", "--checkpoint", str(trained / "run"), "--latents", str(trained / "lat"),
                 "--out", str(trained / "cf_bad"), "--set", "disease=XX", "--quiet"]) == 2  # fmt: skip


def test_longitudinal_train_and_forecast(tmp_path):
    write_latents(tmp_path / "lat", sessions=3, n_subjects=4)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(TRAIN_YAML))
    rc = main(["train-longitudinal", "--latents", str(tmp_path / "lat"), "--out", str(tmp_path / "run"),
               "--config", str(tmp_path / "cfg.yaml"), "--quiet", "--device", "cpu"])  # fmt: skip
    assert rc == 0
    from g3n_dit.checkpoint import load_checkpoint

    ck = load_checkpoint(tmp_path / "run")
    assert ck.state["data"]["items"] == 12  # 4 subjects x 3 ordered pairs of 3 sessions
    assert {c["spec"]["name"]: c["spec"]["drop_prob"] for c in ck.state["conditions"]}["interval"] == 0.0
    rc = main(["forecast", "--checkpoint", str(tmp_path / "run"), "--latents", str(tmp_path / "lat"),
               "--keys", "toy-sub-01-ses-0-t1", "--intervals", "1", "3", "--steps", "4",
               "--out", str(tmp_path / "fc"), "--quiet", "--device", "cpu"])  # fmt: skip
    assert rc == 0
    out = sorted(gs.ShardSet.open(tmp_path / "fc"), key=lambda s: s.meta.age)
    assert [s.meta.age for s in out] == [62.0, 64.0]
    assert all(s.meta.subject == "sub-01" and s.meta.synthetic for s in out)
    assert out[0].meta.request["interval"] == 1.0 and out[0].meta.request["steps"] == 4
    assert out[1].meta.request["conditions"]["interval"] == 3.0
    vocab = {c["spec"]["name"]: c["vocab"] for c in ck.state["conditions"]}
    assert vocab["cdr"] == ["0.0", "0.5", "1.0"] and vocab["diagnosis"] == ["AD", "HC", "MCI"]
    # a condition override: CDR given as '1' matches the label '1.0' and lands in metadata as 1.0
    rc = main(["forecast", "--checkpoint", str(tmp_path / "run"), "--latents", str(tmp_path / "lat"),
               "--keys", "toy-sub-01-ses-0-t1", "--intervals", "2", "--steps", "2", "--condition", "cdr=1",
               "--out", str(tmp_path / "fc3"), "--quiet", "--device", "cpu"])  # fmt: skip
    assert rc == 0
    (s,) = list(gs.ShardSet.open(tmp_path / "fc3"))
    assert s.meta.cdr == 1.0 and s.meta.request["conditions"]["cdr"] == "1"
    # a bridge checkpoint cannot sample from noise
    assert main(["sample", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "x"),
                 "--condition", "diagnosis=AD", "--quiet"]) == 2  # fmt: skip


def test_longitudinal_takes_the_latent_width_from_the_data(tmp_path):
    """A preset's width (tiny: 4 channels) yields to the manifest's, baseline context included."""
    write_latents(tmp_path / "lat", sessions=2, n_subjects=3, channels=6)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(TRAIN_YAML))
    rc = main(["train-longitudinal", "--latents", str(tmp_path / "lat"), "--out", str(tmp_path / "run"),
               "--preset", "tiny", "--config", str(tmp_path / "cfg.yaml"), "--quiet", "--device", "cpu"])  # fmt: skip
    assert rc == 0
    from g3n_dit.checkpoint import load_checkpoint

    model_cfg = load_checkpoint(tmp_path / "run").run_config.model
    assert model_cfg.channels == 6 and model_cfg.context_channels == 6
