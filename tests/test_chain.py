"""The whole chain on a very small synthetic cohort, through the demo runner: every stage's shard
set names its parents by digest, and those parents exist in the run folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import g3n_shards as gs
from g3n_pipeline.demo import DemoConfig, run_demo
from g3n_pipeline.runner import is_done
from g3n_pipeline.demo import build_stages, headline

TINY = dict(subjects=24, real=False, from_scratch=True, workers=2, mae_steps=4, tokenizer_epochs=1, tokenizer_steps_per_epoch=2,
            dit_steps=4, longitudinal_steps=4, samples_per_request=2, sample_steps=2, forecast_steps=3,
            recon_volumes=2, probe_permutations=4, anatomy_recon=True)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    cfg = DemoConfig(run_dir=tmp_path_factory.mktemp("chain") / "run", **TINY)
    return run_demo(cfg)


def shard_sets(run: Path) -> dict[str, gs.ShardSet]:
    return {str(p.parent.relative_to(run)): gs.ShardSet.open(p.parent) for p in sorted(run.rglob("manifest.json"))}


def test_every_parent_is_named_by_digest_and_exists(run):
    sets = shard_sets(run)
    expected = {"volumes-synth", "volumes", "volumes-train", "volumes-test", "tokens", "latents", "latents-train",
                "latents-test", "samples", "samples-decoded", "forecasts", "counterfactuals"}
    assert expected <= set(sets), sorted(set(sets))
    digests = {ss.digest: name for name, ss in sets.items()}
    for name, ss in sets.items():
        for parent in ss.manifest.parents:
            assert parent.digest.startswith("sha256:") and len(parent.digest) == 71, (name, parent)
            assert parent.digest in digests, f"{name}: parent {parent.kind} {parent.digest} is not in the run"
            assert sets[digests[parent.digest]].kind == parent.kind
    lineage = {name: {digests[p.digest] for p in ss.manifest.parents} for name, ss in sets.items()}
    assert lineage["tokens"] == {"volumes"}
    assert lineage["latents"] == {"volumes"}
    assert lineage["volumes-train"] == {"volumes"} and lineage["latents-test"] == {"latents"}
    assert lineage["samples"] == {"latents-train"} and lineage["samples-decoded"] == {"samples"}
    assert sets["latents"].manifest.tokenizer is not None and sets["tokens"].manifest.encoder is not None
    assert all(s.meta.synthetic and s.meta.request for s in sets["samples"])


def test_every_stage_recorded_and_is_skipped_on_rerun(run, capsys):
    cfg = DemoConfig(run_dir=run, **TINY)
    assert all(is_done(run, st) for st in build_stages(cfg))
    run_demo(cfg)
    out = capsys.readouterr().out
    assert out.count("done already, skipped") == len(build_stages(cfg))


def test_report_and_results_exist(run):
    assert (run / "eval" / "report" / "index.html").is_file()
    assert (run / "probe" / "results.csv").is_file()
    # the headline probe rows carry their permutation test (sex and age are scored even on 24 subjects)
    lines = headline(run)
    assert any(line.startswith("probe sex (all): auc") and "permutation test: p" in line and "over 4 shuffled" in line
               for line in lines), lines
    assert (run / "probe" / "permutations" / "brain_age__T1.csv").is_file()
    for folder, name in (("recon", "recon"), ("controllability", "controllability"), ("memorisation", "memorisation"),
                         ("fidelity", "fidelity"), ("forecast", "forecast"), ("controllability-latent", "controllability")):
        d = json.loads((run / "eval" / folder / f"{name}.json").read_text(encoding="utf-8"))
        assert d["protocol_version"] and d["inputs"], folder
    lat = json.loads((run / "eval" / "controllability-latent" / "controllability.json").read_text())
    assert lat["settings"]["space"] == "latent"
    # the demo samples paired: each sex request's sample j shares its noise with the other's
    for folder in ("controllability", "controllability-latent"):
        doc = json.loads((run / "eval" / folder / "controllability.json").read_text())
        res = doc["results"]
        assert doc["settings"]["generation"]["paired"] is True, folder
        assert res["tasks"]["sex:F-vs-M"]["paired"]["n_groups"] == TINY["samples_per_request"], folder
        assert res["sweeps"]["age"]["paired"]["n_groups"] == TINY["samples_per_request"], folder
        # each probe's real column is tested on the demo's shuffles, and says whether it is blind
        sex = res["tasks"]["sex:F-vs-M"]["real"]
        assert sex["permutation"]["permutations"] == 4 and isinstance(sex["blind"], bool), folder
    assert any(line.startswith("controllability [latent space] sex:F-vs-M") and "permutation p" in line
               for line in lines), lines
    # forecasts are paired by baseline: does each subject's forecast age with the interval?
    assert any(line.startswith("forecasts: brain-age change") and "; paired: " in line for line in lines), lines
    fc = json.loads((run / "eval" / "forecast" / "forecast.json").read_text())
    assert fc["settings"]["generation"]["steps"] == TINY["forecast_steps"]
    page = (run / "eval" / "report" / "index.html").read_text(encoding="utf-8")
    assert "paired moved" in page and "Anatomy of generated samples" in page
    # the known anatomy: every effect is measured in real data and on the paired samples that asked for it
    effects = json.loads((run / "eval" / "anatomy" / "anatomy.json").read_text())["results"]["effects"]
    assert len(effects) == 5
    for name, row in effects.items():
        assert row["real"]["difference"] is not None, name
        if name.startswith(("diagnosis:HC->AD", "diagnosis:HC->PD", "age:")):  # T1 requests the demo makes
            assert row["paired"]["n_groups"] == TINY["samples_per_request"], name
    assert any(line.startswith("anatomy (no probe) diagnosis:HC->AD [T1]") for line in headline(run))
    # anatomy_recon: each effect also measured on the tokenizer's reconstructions of the real volumes
    assert all("recon" in row and "recon_keeps" in row for row in effects.values())
    assert any("tokenizer reconstructions keep" in line for line in headline(run) if line.startswith("anatomy"))
    assert "recon keeps" in page
    # and the decoded-space probes score the reconstructions of the real volumes they held out
    ctrl = json.loads((run / "eval" / "controllability" / "controllability.json").read_text())
    sex = ctrl["results"]["tasks"]["sex:F-vs-M"]["recon"]
    assert sex["n"] > 0 and isinstance(sex["blind"], bool)
    assert ctrl["results"]["sweeps"]["age"]["recon"]["recon"]["n"] > 0
    assert any(i["role"] == "reconstructed real volumes" for i in ctrl["inputs"])
    assert any(line.startswith("controllability [decoded + re-encoded] sex:F-vs-M") and "on reconstructions of held-out"
               in line for line in lines), lines
    assert "recon AUC, p (to beat)" in page
