"""g3n-zoo-build on a small cohort: every stage trains a few steps, the pack step writes a zoo that
verifies and loads, its cards hold no machine path, and the demo's warm start uses it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import g3n_shards
import g3n_zoo
from g3n_pipeline import zoo_build, zoo_pack
from g3n_pipeline.demo import DemoConfig, build_stages
from g3n_pipeline.runner import _fingerprint

SMALL = dict(subjects=24, real=False, mae_steps=2, mae_extra_subjects=3, mae_seeds=[2025, 7], mae_val_subjects=40,
             tokenizer_epochs=1, tokenizer_steps_per_epoch=1, dit_steps=2, bridge_steps=2)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("zoo-build")
    cfg = tmp / "zoo.yaml"
    cfg.write_text(yaml.safe_dump({**SMALL, "run_dir": str(tmp / "run")}))
    assert zoo_build.main(["--config", str(cfg), "--pack", str(tmp / "zoo")]) == 0
    return tmp / "run", tmp / "zoo"


def test_pack_writes_a_zoo_that_verifies_with_complete_cards(built, monkeypatch):
    run, zoo = built
    monkeypatch.setenv("G3N_ZOO_DIR", str(zoo))
    assert g3n_zoo.model_names() == ["autoencoderkl", "bridge", "dit", "mae", "mae-cnn"]
    assert g3n_zoo.verify() == []
    for name in g3n_zoo.model_names():
        m = g3n_zoo.get(name)
        text = "".join(f.read_text() for f in m.folder.iterdir() if f.suffix in (".json", ".md"))
        assert str(run) not in text and str(zoo) not in text
        assert not any(str(run).encode() in f.read_bytes() for f in m.folder.iterdir())  # weights' metadata too
        card = m.card
        assert card["training"]["wall_minutes"] is not None and card["training"]["final"]
        assert card["data"]["digest"].startswith("sha256:") and card["weights"]["dtype"] == "float16"
        assert card["weights"]["max_relative_roundtrip_error"] < 1e-3
        assert any(c.startswith("python -m g3n_") and "$RUN" in c for c in card["command"])
    assert json.loads((zoo / "mae" / "config.json").read_text())["train"]["total_steps"] == SMALL["mae_steps"]
    # the MAE alone pretrains on 3 more subjects of another seed; the others on the train split only
    mae, dit = g3n_zoo.get("mae").card, g3n_zoo.get("dit").card
    assert mae["data"]["set"].startswith("volumes-mae:") and "3 more synthetic subjects drawn with seed 4242" in mae["data"]["set"]
    assert dit["data"]["set"].startswith("volumes-train:") and mae["data"]["subjects"] == dit["data"]["subjects"] + 3
    assert "--subject-prefix pre" in mae["command"][0]
    # two candidates (seeds 2025 and 7), chosen on 40 validation subjects; the card shows both and the rule
    sel = mae["selection"]
    assert [c["name"] for c in sel["candidates"]] == ["mae-s2025", "mae-s7"] and sel["kept"] in ("mae-s2025", "mae-s7")
    assert sel["validation"]["set"].startswith("40 synthetic subjects drawn with seed 9001") and "shortfall" in sel["rule"]
    assert set(sel["raw"]) == {"brain_age", "disease"}
    kept_seed = sel["kept"].removeprefix("mae-s")
    assert json.loads((zoo / "mae" / "config.json").read_text())["train"]["seed"] == int(kept_seed)
    assert any("--subject-prefix val" in c for c in mae["command"])
    assert any("--data '$RUN/volumes-mae'" in c and f"--seed {kept_seed} " in c for c in mae["command"])
    assert mae["command"][-1].startswith("python -m g3n_pipeline.mae_select --raw '$RUN/mae-val/probe-raw'")
    md = (zoo / "mae" / "card.md").read_text()
    assert "chosen among 2 candidates" in md and f"{sel['kept']} |" in md and "<- kept" in md
    with pytest.raises(ValueError, match="mae_extra_seed must differ"):
        zoo_build.ZooConfig(mae_extra_subjects=3, mae_extra_seed=2025)
    with pytest.raises(ValueError, match="mae_val_seed"):
        zoo_build.ZooConfig(mae_seeds=[1, 2], mae_val_seed=2025)
    with pytest.raises(ValueError, match="repeats a seed"):
        zoo_build.ZooConfig(mae_seeds=[1, 1])
    # Table 5 in kind beside the baseline: both tokenizers, scored on the held-out split
    t5 = json.loads((zoo / "autoencoderkl" / "table5.json").read_text())
    assert [r["tokenizer"] for r in t5["results"]["rows"]] == ["MAE-CNN c=32", "AutoencoderKL"]
    assert [r["values_per_volume"] for r in t5["results"]["rows"]] == [38_400, 76_800]
    assert g3n_zoo.get("autoencoderkl").card["stage"] == "g3n-tokenizer"
    # the MAE-CNN tokenizer in two stages: the second (decoder alone, from the first's best epoch)
    # keeps the projection, so latents-train (encoded by the first) is the shipped tokenizer's
    mc = g3n_zoo.get("mae-cnn")
    assert [c.split()[3] for c in mc.card["command"]] == ["train", "encode", "train"]
    assert "--init '$RUN/tokenizer/tokenizer.safetensors'" in mc.card["command"][2]
    assert [st["folder"] for st in mc.card["training"]["final"]["stages"]] == ["tokenizer", "tokenizer-decoder"]
    conf = json.loads((mc.folder / "config.json").read_text())
    assert conf["train"]["freeze"] == ["proj"] and conf["earlier_stages"][0]["freeze"] == []
    from g3n_tokenizer.mae_cnn import MaeCnnTokenizer

    first = MaeCnnTokenizer.from_checkpoint(run / "tokenizer" / "tokenizer.safetensors").head.proj.weight
    assert mc.card["training"]["steps"] == 2 and "training stages, each from the one before" in (mc.folder / "card.md").read_text()
    shipped = MaeCnnTokenizer.from_checkpoint(mc.path).head.proj.weight
    assert torch.allclose(shipped.float(), first.half().float())  # the same projection, up to its fp16 packing
    akl = g3n_zoo.get("autoencoderkl").card
    assert [c.split()[3] for c in akl["command"]] == ["train", "train"] and "--init" in akl["command"][1]
    assert [st["folder"] for st in akl["training"]["final"]["stages"]] == ["tokenizer-akl", "tokenizer-akl-2"]


def test_pack_only_replaces_the_named_models(built, tmp_path):
    """--only writes the named models and keeps every other file byte for byte."""
    run, zoo = built
    copy = tmp_path / "zoo"
    shutil.copytree(zoo, copy)
    before = {p.relative_to(copy): p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    cfg = zoo_build.ZooConfig(run_dir=run, **SMALL)
    zoo_pack.pack(cfg, copy, only={"autoencoderkl"})
    after = {p.relative_to(copy): p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    assert set(after) == set(before)
    changed = {str(p).split("/")[0] for p in after if after[p] != before[p]}
    assert changed <= {"autoencoderkl", "manifest.json"}
    assert {p: b for p, b in after.items() if str(p).startswith("mae")} == \
        {p: b for p, b in before.items() if str(p).startswith("mae")}
    with pytest.raises(zoo_build.StageFailed, match="unknown model"):
        zoo_pack.pack(cfg, copy, only={"nope"})


def test_only_runs_the_stages_of_the_named_models(tmp_path):
    """--only trains just what the named models need; Table 5 scores a kept tokenizer from the zoo."""
    cfg = zoo_build.ZooConfig(run_dir=tmp_path / "run", **SMALL)
    zoo = tmp_path / "zoo"
    names = lambda only: [st.name for st in zoo_build.build_zoo_stages(cfg, only, zoo)]  # noqa: E731
    assert names(None) == names(set(zoo_build.MODELS))
    assert names({"mae", "mae-cnn", "dit", "bridge"}) == [
        "synth", "cohort", "mae-data", "mae-val", "mae-s2025", "mae-s7", "mae", "tokenizer", "tokenizer-decoder",
        "tokenizers", "dit", "bridge"]
    assert names({"autoencoderkl"}) == ["synth", "cohort", "tokenizer-baseline", "tokenizer-baseline-2", "tokenizers"]
    table5 = {st.name: st for st in zoo_build.build_zoo_stages(cfg, {"mae", "mae-cnn"}, zoo)}["tokenizers"]
    argv = table5.commands(cfg.run_dir)[0]
    assert str(zoo / "autoencoderkl" / "tokenizer.safetensors") in argv
    assert str(cfg.run_dir / "tokenizer-decoder" / "tokenizer.safetensors") in argv
    assert list(table5.external) == [zoo / "autoencoderkl" / "tokenizer.safetensors"]


def test_only_refuses_a_zoo_of_models_that_do_not_fit_together(built, tmp_path, capsys):
    """A model is rebuilt with the one it is trained on (UPSTREAM), unless this run's is the zoo's."""
    run, zoo = built
    zoo_pack.check_links(run, zoo, {"mae-cnn", "dit", "bridge"})  # this run's MAE is the zoo's: fine
    zoo_pack.check_links(run, zoo, {"mae"})  # and a re-packed MAE keeps the zoo's tokenizer valid
    zoo_pack.check_links(run, zoo, {"dit"})
    fresh = tmp_path / "fresh"
    with pytest.raises(zoo_build.StageFailed, match=r"--only dit: this run's dit is trained on this run's mae-cnn, "
                       r"which \(not trained yet\) will differ from the zoo's; add mae-cnn to --only"):
        zoo_pack.check_links(fresh, zoo, {"dit"})
    with pytest.raises(zoo_build.StageFailed, match="the zoo's mae-cnn is trained on the zoo's mae.*add mae-cnn"):
        zoo_pack.check_links(fresh, zoo, {"mae"})
    zoo_pack.check_links(fresh, zoo, {"mae", "mae-cnn", "dit", "bridge", "autoencoderkl"})
    other = tmp_path / "zoo"  # a zoo whose MAE is another run's (one weight moved)
    shutil.copytree(zoo, other)
    from safetensors.torch import load_file, save_file

    w = load_file(other / "mae" / "model.safetensors")
    k = sorted(w)[0]
    w[k] = w[k] + 1
    save_file(w, other / "mae" / "model.safetensors")
    with pytest.raises(zoo_build.StageFailed, match="which differs from the zoo's; add mae to --only"):
        zoo_pack.check_links(run, other, {"mae-cnn", "dit", "bridge"})
    zoo_pack.check_links(run, other, {"autoencoderkl"})  # no link to the MAE: nothing to check
    # the command refuses before training anything
    for zoo_dir, why in ((other, "which differs from the zoo's; add mae to --only"), (tmp_path / "nothing", "there is none")):
        with pytest.raises(SystemExit):
            zoo_build.main(["--run-dir", str(run), "--pack", str(zoo_dir), "--only", "dit", "bridge", "mae-cnn"])
        assert why in capsys.readouterr().err


def test_only_rebuilds_one_tokenizer_and_scores_the_kept_one_from_the_zoo(built, tmp_path, capsys):
    run, zoo = tmp_path / "run", tmp_path / "zoo"
    shutil.copytree(built[0], run, symlinks=True)
    shutil.copytree(built[1], zoo)
    (tmp_path / "zoo.yaml").write_text(yaml.safe_dump({**SMALL, "run_dir": str(run)}))
    before = {p.relative_to(zoo): p.read_bytes() for p in zoo.rglob("*") if p.is_file()}
    assert zoo_build.main(["--config", str(tmp_path / "zoo.yaml"), "--pack", str(zoo), "--only", "autoencoderkl"]) == 0
    out = capsys.readouterr().out
    assert "[5/5] the two tokenizers side by side" in out and "MAE pretraining" not in out  # (nor checked)
    after = {p.relative_to(zoo): p.read_bytes() for p in zoo.rglob("*") if p.is_file()}
    assert {p for p in after if after[p] != before.get(p)} <= {
        Path("manifest.json"), *(p for p in after if p.parts[0] == "autoencoderkl")}
    t5 = json.loads((zoo / "autoencoderkl" / "table5.json").read_text())
    assert [r["tokenizer"] for r in t5["results"]["rows"]] == ["MAE-CNN c=32", "AutoencoderKL"]
    assert "mae-cnn/tokenizer.safetensors" in json.dumps(t5)


def test_a_rerun_skips_every_stage(built, capsys):
    run, _ = built
    cfg = zoo_build.ZooConfig(run_dir=run, **SMALL)
    (run.parent / "again.yaml").write_text(yaml.safe_dump({**SMALL, "run_dir": str(run)}))
    assert zoo_build.main(["--config", str(run.parent / "again.yaml")]) == 0
    assert capsys.readouterr().out.count("done already, skipped") == len(zoo_build.build_zoo_stages(cfg))


def test_the_demo_starts_from_the_zoo_and_its_fingerprint_follows_the_weights(built, monkeypatch, tmp_path):
    zoo = tmp_path / "zoo"
    shutil.copytree(built[1], zoo)
    monkeypatch.setenv("G3N_ZOO_DIR", str(zoo))
    cfg = DemoConfig(run_dir=tmp_path / "demo")
    stages = {st.name: st for st in build_stages(cfg)}
    for stage, model in (("mae", "mae"), ("tokenizer", "mae-cnn"), ("dit", "dit"), ("longitudinal", "bridge")):
        # the bridge's stage also follows its settings file (g3n_pipeline/zoo/bridge.yaml)
        extra = [zoo_build.zoo_file(cfg.longitudinal_config)] if stage == "longitudinal" else []
        assert list(stages[stage].external) == [g3n_zoo.get(model).path, *extra], stage
        if stage != "longitudinal":  # (its forecast command needs the run's latents)
            argv = stages[stage].commands(cfg.run_dir)[0]
            assert argv[argv.index("--init") + 1] == str(g3n_zoo.get(model).path), stage
    # the shipped Table 5 (both tokenizers on the held-out split) goes into the report and the headline
    table5 = g3n_zoo.get("autoencoderkl").folder / "table5.json"
    assert list(stages["eval"].external) == [table5]
    from g3n_pipeline.demo import tokenizer_lines

    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "demo-config.json").write_text(cfg.model_dump_json())
    lines = tokenizer_lines(cfg.run_dir)
    assert len(lines) == 2 and "MAE-CNN c=32 38,400 values/volume" in lines[0] and "AutoencoderKL 76,800" in lines[1]
    (cfg.run_dir / "demo-config.json").write_text(cfg.model_copy(update={"from_scratch": True}).model_dump_json())
    assert tokenizer_lines(cfg.run_dir) == []  # a run that trains its own tokenizer: not its figures
    scratch = [st for st in build_stages(DemoConfig(run_dir=tmp_path / "demo", from_scratch=True))
               if st.name in ("mae", "tokenizer", "dit")]
    assert all(not st.external and "--init" not in st.commands(cfg.run_dir)[0] for st in scratch)
    before = _fingerprint(cfg.run_dir, stages["dit"])
    with open(zoo / "dit" / "ema.safetensors", "r+b") as f:  # new weights: the stage is no longer done
        f.seek(-2, 2)
        f.write(b"\x00\x01")
    assert _fingerprint(cfg.run_dir, stages["dit"]) != before
    with pytest.raises(Exception, match="SHA-256 differs"):  # and the demo refuses weights the manifest does not list
        build_stages(cfg)


def test_an_edited_training_config_trains_its_stage_again(tmp_path):
    """The stage's fingerprint holds the config file's content: a changed number of epochs in the
    same file is a changed setting, not a finished stage."""
    for field, name, key in (("tokenizer_config", "tokenizer", "max_epochs:"),
                             ("tokenizer_decoder_config", "tokenizer-decoder", "max_epochs:"),
                             ("baseline_tokenizer_config", "tokenizer-baseline", "max_epochs:"),
                             ("baseline_tokenizer_stage2_config", "tokenizer-baseline-2", "max_epochs:"),
                             ("bridge_config", "bridge", "segment_years:")):
        own = tmp_path / f"{name}.yaml"
        text = zoo_build.zoo_file(getattr(zoo_build.ZooConfig(), field)).read_text()
        assert key in text, (name, key)
        own.write_text(text)
        cfg = zoo_build.ZooConfig(run_dir=tmp_path / "run", **{field: str(own)})
        stage = {st.name: st for st in zoo_build.build_zoo_stages(cfg)}[name]
        before = _fingerprint(cfg.run_dir, stage)
        own.write_text(text.replace(key, f"{key} 1 #"))
        assert _fingerprint(cfg.run_dir, stage) != before, name


def test_a_decoder_stage_that_would_change_the_latents_is_refused(tmp_path):
    own = tmp_path / "decoder.yaml"
    own.write_text(zoo_build.zoo_file("tokenizer-mae-cnn-decoder.yaml").read_text().replace("freeze: [proj]", "freeze: []"))
    with pytest.raises(zoo_build.StageFailed, match="must freeze 'proj'"):
        zoo_build.build_zoo_stages(zoo_build.ZooConfig(run_dir=tmp_path / "run", tokenizer_decoder_config=str(own)))
    cfg = zoo_build.ZooConfig(run_dir=tmp_path / "run", tokenizer_decoder_config=None, baseline_tokenizer_stage2_config=None)
    stages = {st.name: st for st in zoo_build.build_zoo_stages(cfg)}
    assert not {"tokenizer-decoder", "tokenizer-baseline-2"} & set(stages)
    assert zoo_build.tokenizer_folders(cfg, "mae-cnn") == ("tokenizer",)
    table5 = stages["tokenizers"].commands(cfg.run_dir)[0]
    assert str(cfg.run_dir / "tokenizer" / "tokenizer.safetensors") in table5
    assert str(cfg.run_dir / "tokenizer-akl" / "tokenizer.safetensors") in table5


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """A copy of the volumes set ``src`` with ``edit(key, meta, volume) -> (meta, volume) | None``
    applied to every sample (None leaves the sample out)."""
    import g3n_shards as gs

    ss = gs.ShardSet.open(src)
    with gs.ShardWriter(dst, kind="volumes", producer=gs.Producer(package="t"), geometry=ss.manifest.geometry) as w:
        for s in ss:
            out = edit(s.key, s.meta, np.array(s.arrays["volume"]))
            if out is not None:
                w.write(s.key, out[0], {"volume": out[1]})
    return dst


def test_the_demo_takes_the_zoos_cohort_rendered_on_another_cpu_and_refuses_another(built, monkeypatch, tmp_path, capsys):
    """Another CPU's vector units flip a few voxels of the synthetic cohort by one rounding step, so
    the set digest differs; the zoo's train-split fingerprint tells that apart from another cohort."""
    from g3n_pipeline import train_split
    from g3n_pipeline.demo_inputs import _check_zoo_data
    from g3n_pipeline.runner import StageFailed

    run, zoo = built
    monkeypatch.setenv("G3N_ZOO_DIR", str(zoo))
    fp = train_split.read(zoo / "mae" / train_split.FILE_NAME)
    assert fp["digest"] == g3n_zoo.get("mae-cnn").card["data"]["digest"] and fp["machine"]
    train = run / "volumes-train"
    problems, worst = train_split.compare(fp, g3n_shards.ShardSet.open(train))
    assert problems == [] and worst < 0.01  # (the file keeps 9 digits)

    def check(edit) -> str:
        case = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        _rewrite(train, case / "volumes-train", edit)
        _check_zoo_data(case)
        return capsys.readouterr().out

    rng = np.random.default_rng(0)

    def rounding(key, meta, v):  # 5 voxels in a million, one step (the synth writes whole numbers)
        idx = rng.choice(v.size, size=max(1, v.size // 200_000), replace=False)
        v.flat[idx] += rng.choice([-1.0, 1.0], size=idx.size)
        return meta, v

    assert "differ from theirs by rounding only" in check(rounding)
    with pytest.raises(StageFailed, match="volume differs") as e:  # another rendering: 1 % brighter
        check(lambda k, m, v: (m, v * 1.01) if k == sorted(fp["volumes"])[0] else (m, v))
    assert sorted(fp["volumes"])[0] in str(e.value) and "--from-scratch" in str(e.value)
    with pytest.raises(StageFailed, match="labels differ"):
        check(lambda k, m, v: (m.model_copy(update={"age": m.age + 1}), v))
    with pytest.raises(StageFailed, match="1 of its samples missing"):
        check(lambda k, m, v: None if k == sorted(fp["volumes"])[-1] else (m, v))
