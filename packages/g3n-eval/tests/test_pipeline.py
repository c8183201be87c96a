"""The g3n-eval commands end to end on tiny sets (through the CLI, in-process)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from g3n_eval import PROTOCOL_VERSION
from g3n_eval.cli import main


def _doc(path):
    doc = json.loads(path.read_text())
    assert doc["protocol_version"] == PROTOCOL_VERSION and isinstance(doc["settings"], dict)
    for ref in doc["inputs"]:
        assert ref["digest"] and ref["digest"].startswith("sha256:"), ref
    return doc


def test_recon_through_registry(runs):
    out, codes = runs
    assert codes["recon"] == 0
    doc = _doc(out / "recon" / "recon.json")
    s = doc["results"]["summary"]
    assert doc["results"]["n"] == 6 and s["mse"]["n"] == 6
    assert s["mse"]["mean"] > 0 and -1 <= s["ssim_brain"]["mean"] < 1  # an untrained decoder is not perfect
    assert doc["settings"]["tokenizer"]["name"] == "mae-cnn" and doc["settings"]["tokenizer"]["checkpoint_digest"]
    rows = list(csv.DictReader((out / "recon" / "recon_per_volume.csv").open()))
    assert len(rows) == 6 and {"mse_brain", "psnr", "ssim"} <= set(rows[0])
    assert (out / "recon" / "recon-volumes" / "manifest.json").is_file()


def test_recon_identical_set_is_perfect(work, volumes_set):
    out = work / "runs" / "recon-identity"
    assert main(["recon", "--volumes", str(volumes_set), "--recon", str(volumes_set), "--out", str(out), "--no-progress"]) == 0
    s = _doc(out / "recon.json")["results"]["summary"]
    assert s["mse"]["max"] == 0 and s["mse_brain"]["max"] == 0
    assert s["ssim"]["min"] == pytest.approx(1.0) and s["ssim_brain"]["min"] == pytest.approx(1.0)
    assert s["psnr"]["n_infinite"] == s["psnr"]["n"]


def test_fidelity(runs, inception_weights):
    out, codes = runs
    assert codes["fidelity"] == 0
    doc = _doc(out / "fidelity" / "fidelity.json")
    fid = doc["results"]["fid"]
    assert set(fid) == {"generated_vs_real", "generated_vs_recon", "recon_vs_real"}
    for row in fid.values():
        assert set(row) == {"sagittal", "coronal", "axial", "pooled"} and all(math.isfinite(v) and v >= 0 for v in row.values())
    assert all(math.isfinite(v) for v in doc["results"]["encoder_fd"].values())
    st = doc["settings"]
    assert st["fid"]["weights_digest"].startswith("sha256:") and st["fid"]["image_size"] == 75
    assert st["generation"]["sampler"] == "euler" and st["generation"]["steps"] == 50


def test_fidelity_without_weights_is_a_clear_error(work, volumes_set, capsys):
    missing = work / "no-such-inception.safetensors"
    rc = main(["fidelity", "--real", str(volumes_set), "--recon", str(volumes_set), "--inception-weights", str(missing),
               "--out", str(work / "runs" / "fid-missing"), "--no-progress"])
    assert rc == 2
    assert str(missing) in capsys.readouterr().err


def test_controllability(runs):
    out, codes = runs
    assert codes["controllability"] == 0
    doc = _doc(out / "controllability" / "controllability.json")
    row = doc["results"]["tasks"]["sex:F-vs-M"]
    assert row["cond"]["n"] == 8 and 0 <= row["cond"]["agreement"] <= 1
    assert row["null"]["n"] == 4 and row["prior"]["n"] == 16
    assert "diagnosis:HC-vs-PD" in doc["results"]["skipped"]
    sw = doc["results"]["sweeps"]["age"]
    assert set(sw["levels"]) == {"30", "50", "70"} and sw["n"] == 9
    assert doc["settings"]["generation"]["seeds"] == {"n": 12, "distinct": 12, "min": 0, "max": 11, "contiguous": True}
    assert (out / "controllability" / "sweep_age.png").is_file()


def test_memorisation_gate(runs, work, latent_sets):
    out, codes = runs
    assert codes["memorisation"] == 0  # noisy samples: not memorised
    doc = _doc(out / "memorisation" / "memorisation.json")
    assert doc["results"]["memorisation"] is False and doc["results"]["ratio_of_means"] > 0.9
    rc = main(["memorisation", "--synthetic", str(latent_sets["copies"]), "--train", str(latent_sets["train"]),
               "--heldout", str(latent_sets["heldout"]), "--gate", "--out", str(work / "runs" / "memo-copies"), "--no-progress"])
    assert rc == 1
    doc = _doc(work / "runs" / "memo-copies" / "memorisation.json")
    assert doc["results"]["n_copies"] == 6
    # without --gate the audit reports but does not block
    assert main(["memorisation", "--synthetic", str(latent_sets["copies"]), "--train", str(latent_sets["train"]),
                 "--heldout", str(latent_sets["heldout"]), "--out", str(work / "runs" / "memo-nogate"), "--no-progress"]) == 0


def test_memorisation_npy_inputs(work):
    rng = np.random.default_rng(0)
    d = work / "npy"
    d.mkdir()
    for name, seed, n in (("s", 1, 20), ("t", 2, 40), ("h", 3, 20)):
        np.save(d / f"{name}.npy", np.random.default_rng(seed).normal(size=(n, 12, 4)))
    assert main(["memorisation", "--synthetic", str(d / "s.npy"), "--train", str(d / "t.npy"), "--heldout", str(d / "h.npy"),
                 "--gate", "--out", str(d / "out"), "--no-progress"]) == 0
    t = np.load(d / "t.npy")
    np.save(d / "copies.npy", t[rng.choice(40, 20)])
    assert main(["memorisation", "--synthetic", str(d / "copies.npy"), "--train", str(d / "t.npy"), "--heldout",
                 str(d / "h.npy"), "--gate", "--out", str(d / "out2"), "--no-progress"]) == 1


def test_forecast(runs):
    out, codes = runs
    assert codes["forecast"] == 0
    doc = _doc(out / "forecast" / "forecast.json")
    r = doc["results"]
    assert r["n_pairs"] == 8 and set(r["age"]["levels"]) == {"1", "2", "4", "8"}
    assert math.isfinite(r["age"]["slope"])
    pair = r["age"]["paired"]  # per baseline: did its forecasts' predicted age rise with the interval?
    assert pair["n_groups"] >= 1 and pair["n_moved"] + pair["n_against"] <= pair["n_groups"] and 0 < pair["p"] <= 1
    assert r["difference"]["mean_abs_change"] > 0
    with np.load(out / "forecast" / "forecast_difference.npz") as z:
        assert z["mean"].shape == (32, 32, 32)
    assert doc["settings"]["generation"]["steps"] == 100


def test_bad_input_names_the_path(work, capsys):
    bogus = work / "not-a-set"
    bogus.mkdir(exist_ok=True)
    assert main(["recon", "--volumes", str(bogus), "--recon", str(bogus), "--out", str(work / "runs" / "bad")]) == 2
    assert str(bogus) in capsys.readouterr().err


@pytest.mark.parametrize("cmd", ["recon", "controllability", "fidelity", "memorisation", "forecast", "report"])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0 and "--out" in capsys.readouterr().out


def test_fidelity_recon_auto_uses_the_generators_tokenizer(work, volumes_set, latent_sets, tokenizer_ckpt, mae_weights):
    out = work / "runs" / "fid-auto"
    assert main(["fidelity", "--real", str(volumes_set), "--generated", str(latent_sets["synthetic"]), "--recon", "auto",
                 "--tokenizer-checkpoint", str(tokenizer_ckpt), "--skip-fid", "--encoder", str(mae_weights), "--limit", "5", "--arm-field", "sex",
                 "--out", str(out), "--no-progress"]) == 0
    doc = _doc(out / "fidelity.json")
    assert set(doc["results"]["encoder_fd"]) == {"generated_vs_real", "generated_vs_recon", "recon_vs_real"}
    assert doc["results"]["encoder_fd"]["recon_vs_real"] > 0 and doc["results"]["fid"] == {}
    assert doc["settings"]["fid"] is None and doc["settings"]["tokenizers"][0]["name"] == "mae-cnn"
    arms = doc["results"]["arms"]
    # the first 5 keys hold 2 'M' requests and 1 'F': F is skipped (too few), M is measured
    assert set(arms) == {"M"} and set(doc["results"]["arms_skipped"]) == {"F"}
    assert arms["M"]["n"]["generated"] == 2 and arms["M"]["n"]["real"] == arms["M"]["n"]["recon"] == 3
    assert doc["results"]["arms_mean"]["encoder_fd"]["generated_vs_real"] == pytest.approx(
        np.mean([a["encoder_fd"]["generated_vs_real"] for a in arms.values()]))
    # the per-arm table renders in the report
    from g3n_eval.report import build_report

    page = build_report([out], work / "runs" / "fid-auto-report").read_text()
    assert "sex=M" in page and "mean over arms" in page


def test_recon_set_out_of_order_with_missing_keys(work, volumes_set):
    """Reconstructions written in another order and missing some volumes: pairs by key, rejects the rest."""
    import g3n_shards as gs

    ss = gs.ShardSet.open(volumes_set)
    samples = sorted(ss, key=lambda s: s.key, reverse=True)[:10]  # 10 of 16, reversed
    rec = work / "recon-partial"
    with gs.ShardWriter(rec, kind="volumes", producer=gs.Producer(package="t"), geometry=ss.manifest.geometry,
                        max_shard_samples=3, extra={"intensity": "scanner"}) as w:
        for s in samples:
            w.write(s.key, s.meta, {"volume": s.arrays["volume"] * 1.01})  # scanner units, 1 % brighter
    out = work / "runs" / "recon-partial"
    assert main(["recon", "--volumes", str(volumes_set), "--recon", str(rec), "--out", str(out), "--no-progress"]) == 0
    doc = _doc(out / "recon.json")
    assert doc["results"]["n"] == 10 and doc["results"]["rejected"] == 6
    lines = (out / "rejects.jsonl").read_text().splitlines()
    assert len(lines) == 6 and all("no reconstruction" in json.loads(x)["reason"] for x in lines)
    s = doc["results"]["summary"]
    assert 0 < s["mse_brain"]["mean"] < 0.01 and 0.9 < s["ssim_brain"]["mean"] < 1



def test_controllability_in_latent_space(work, tokenizer_ckpt, volumes_set, capsys):
    """--space latent: probes on token-mean latents. Generated latents carrying the requested
    sex's shift are recognised; latents of another tokenizer or a non-latents set are refused."""
    import g3n_shards as gs
    from g3n_tokenizer.registry import load_tokenizer

    tok = load_tokenizer("mae-cnn", checkpoint=tokenizer_ckpt)
    shape = tuple(tok.latent_shape)
    rng = np.random.default_rng(7)

    def write(path, items, ref=None, generator=False):
        with gs.ShardWriter(path, kind="latents", producer=gs.Producer(package="g3n-eval-tests"),
                            tokenizer=ref or tok.model_ref(), geometry=tok.geometry, overwrite=True,
                            generator=gs.ModelRef(name="test-generator") if generator else None) as w:
            for meta, lat in items:
                w.write(gs.sample_key(meta), meta, {"latent": lat.astype(np.float32)})
        return path

    def lat(sex):
        return rng.normal(0, 1, shape) + (0.8 if sex == "M" else -0.8)

    real = [(gs.SampleMeta(subject=f"r{i}", modality="T1", sex="FM"[i % 2]), lat("FM"[i % 2])) for i in range(24)]
    gen = []
    for i in range(12):
        sex = ["F", "M", None][i % 3]
        req = {"stage": "sample", "conditions": {"sex": sex, "modality": "T1"}, "seed": i}
        gen.append((gs.SampleMeta(subject=f"g{i}", modality="T1", sex=sex, synthetic=True, request=req),
                    lat(sex) if sex else rng.normal(0, 1, shape)))
    real_p, gen_p = write(work / "ctl-real", real), write(work / "ctl-gen", gen, generator=True)
    out = work / "runs" / "controllability-latent"
    assert main(["controllability", "--space", "latent", "--real", str(real_p), "--generated", str(gen_p),
                 "--task", "sex:F,M", "--no-sweep", "--folds", "3", "--out", str(out), "--no-progress"]) == 0
    doc = _doc(out / "controllability.json")
    row = doc["results"]["tasks"]["sex:F-vs-M"]
    assert doc["settings"]["space"] == "latent" and "no decoding" in doc["settings"]["generated_path"]
    assert row["cond"]["n"] == 8 and row["cond"]["agreement"] == 1.0 and row["real"]["auc"] > 0.9
    # another tokenizer's latents are not comparable
    other = tok.model_ref().model_copy(update={"checkpoint_digest": "0" * 64})
    other_p = write(work / "ctl-other", gen, ref=other, generator=True)
    assert main(["controllability", "--space", "latent", "--real", str(real_p), "--generated", str(other_p),
                 "--task", "sex:F,M", "--out", str(work / "runs" / "ctl-bad"), "--no-progress"]) == 2
    assert "only comparable within one tokenizer" in capsys.readouterr().err
    assert main(["controllability", "--space", "latent", "--real", str(volumes_set), "--generated", str(gen_p),
                 "--task", "sex:F,M", "--out", str(work / "runs" / "ctl-bad"), "--no-progress"]) == 2
    assert "needs a latents set as real" in capsys.readouterr().err


def test_volumes_of_decodes_only_the_keys_asked_for(latent_sets, tokenizer_ckpt):
    """The forecast measurement decodes only the baselines its forecasts start from."""
    import g3n_shards as gs
    from g3n_eval.sources import TokenizerCache, volumes_of

    keys = sorted(s.key for s in gs.ShardSet.open(latent_sets["heldout"]))
    want = {keys[1], keys[4], "not-in-the-set"}
    got = volumes_of(latent_sets["heldout"], TokenizerCache(tokenizer_ckpt), only=want)
    assert got.keys == [keys[1], keys[4]] and len(got.arrays) == len(got.metas) == 2
    full = volumes_of(latent_sets["heldout"], TokenizerCache(tokenizer_ckpt))
    assert np.allclose(got.arrays[1], full.arrays[4], atol=1e-5)  # the same decoding (batched otherwise), of fewer volumes


def test_forecast_checks_its_probe_on_real_follow_ups(work, runs, latent_sets, tokenizer_ckpt, mae_weights, volumes_set):
    """Baselines whose set also holds later sessions of the same subject: the forecast JSON says how
    many of those real follow-ups the brain-age probe predicts older, and decodes only what it needs."""
    import g3n_shards as gs
    from g3n_tokenizer.registry import load_tokenizer

    tok = load_tokenizer("mae-cnn", checkpoint=tokenizer_ckpt)
    held = gs.ShardSet.open(latent_sets["heldout"])
    base = work / "lat-heldout-long"
    with gs.ShardWriter(base, kind="latents", producer=gs.Producer(package="g3n-eval-tests"), tokenizer=tok.model_ref(),
                        geometry=tok.geometry, overwrite=True) as w:
        for j, s in enumerate(sorted(held, key=lambda s: s.meta.age)):  # the 3 youngest: one subject's sessions
            meta = s.meta.model_copy(update={"subject": "sub-long", "session": f"ses-{j}"}) if j < 3 else s.meta
            w.write(s.key, meta, {"latent": s.arrays["latent"]})
    out = work / "runs" / "forecast-long"
    assert main(["forecast", "--forecasts", str(latent_sets["forecasts"]), "--baselines", str(base), "--real",
                 str(volumes_set), "--encoder", str(mae_weights), "--tokenizer-checkpoint", str(tokenizer_ckpt),
                 "--out", str(out), "--no-progress"]) == 0
    real = _doc(out / "forecast.json")["results"]["age"]["real_followups"]
    ages = sorted(s.meta.age for s in held)[:3]
    assert real["n"] == 2 and real["mean_interval"] == pytest.approx(np.mean([ages[1] - ages[0], ages[2] - ages[0]]))
    assert real["n_older"] + real["n_younger"] <= 2 and isinstance(real["blind"], bool)
    # the plain run's baselines have one session a subject: no follow-up check
    assert "real_followups" not in _doc(work / "runs" / "forecast" / "forecast.json")["results"]["age"]
