"""The stage runner: a re-run skips a finished stage only while its commands, its input files, the
installed versions and its outputs are unchanged; a stage run again starts over (unless it resumes an
interrupted attempt with the same settings), and so does every stage after it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from g3n_pipeline import runner
from g3n_pipeline.runner import Stage, StageFailed, is_done, run_stages


def _stages(indent: int) -> list[Stage]:
    # `python -m json.tool IN OUT` stands in for a stage command; b reads what a wrote
    def keep(r: Path) -> None:  # a folder output, as a training run leaves one
        (r / "a-dir").mkdir(exist_ok=True)
        (r / "a-dir" / "x.json").write_bytes((r / "a-out.json").read_bytes())

    return [
        Stage("a", "copy the settings", ["a-out.json", "a-dir"], inputs=["settings.json"], after=keep, commands=lambda r: [
            ["json.tool", "--indent", str(indent), str(r / "settings.json"), str(r / "a-out.json")]]),
        Stage("b", "copy a's output", ["b-out.json"], commands=lambda r: [
            ["json.tool", str(r / "a-dir" / "x.json"), str(r / "b-out.json")]]),
    ]


def test_rerun_follows_commands_inputs_and_outputs(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "settings.json").write_text(json.dumps({"steps": 800}))
    assert run_stages(run, _stages(2)) == ["a", "b"]
    log = (run / "logs" / "a.log").read_text()  # each command, then its exit status and wall time
    assert log.startswith("$ ") and "json.tool --indent 2" in log and re.search(r"\[exit 0 after \d+\.\d s\]\n$", log)
    assert run_stages(run, _stages(2)) == []  # nothing changed: all skipped
    assert all(is_done(run, st) for st in _stages(2))

    (run / "a-dir" / "stale.txt").write_text("left by the old run")
    assert run_stages(run, _stages(4)) == ["a", "b"]  # a's command changed: a and everything after it
    assert not (run / "a-dir" / "stale.txt").exists()  # a started over
    assert (run / "a-dir" / "x.json").read_text().startswith('{\n    "steps"')

    (run / "settings.json").write_text(json.dumps({"steps": 2400}))
    assert run_stages(run, _stages(4)) == ["a", "b"]  # an input file changed
    assert json.loads((run / "b-out.json").read_text()) == {"steps": 2400}

    (run / "b-out.json").unlink()
    assert run_stages(run, _stages(4)) == ["b"]  # a missing output: that stage only

    moved = tmp_path / "moved"
    run.rename(moved)
    assert run_stages(moved, _stages(4)) == []  # paths inside the run folder are recorded relative to it


def test_a_tampered_output_that_is_not_a_shard_set_runs_its_stage_again(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "settings.json").write_text(json.dumps({"steps": 800}))
    assert run_stages(run, _stages(2)) == ["a", "b"]
    marker = json.loads((run / ".stages" / "a.json").read_text())
    assert all(str(d).startswith("content:") for d in marker["outputs"].values())  # a digest, not just "exists"
    (run / "a-dir" / "x.json").write_text('{"steps": 1}')  # same names, other content
    assert run_stages(run, _stages(2)) == ["a", "b"]
    assert json.loads((run / "a-dir" / "x.json").read_text()) == {"steps": 800}
    (run / "b-out.json").write_text('{"steps": 2}')  # a tampered file output
    assert run_stages(run, _stages(2)) == ["b"]
    assert json.loads((run / "b-out.json").read_text()) == {"steps": 800}


def test_an_upgraded_package_runs_the_stages_again(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "settings.json").write_text(json.dumps({"steps": 800}))
    versions = runner.installed_versions()
    assert versions["g3n-pipeline"] and "torch" in versions and "numpy" in versions
    assert run_stages(run, _stages(2)) == ["a", "b"]
    assert json.loads((run / ".stages" / "a.json").read_text())["fingerprint"]["versions"] == versions
    monkeypatch.setattr(runner, "installed_versions", lambda: {**versions, "numpy": "0.0.1"})
    assert run_stages(run, _stages(2)) == ["a", "b"]
    monkeypatch.setattr(runner, "installed_versions", lambda: {**versions, "g3n-mae": "9.9"})
    assert run_stages(run, _stages(2)) == ["a", "b"]
    assert run_stages(run, _stages(2)) == []


# a stage command that writes one piece of its output per call and fails while FAIL exists: a stage
# killed half way leaves its piece behind and no done-marker
STEP = """\
import sys
from pathlib import Path
out, tag, fail = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
out.mkdir(exist_ok=True)
(out / f"piece-{tag}").write_text(tag)
if fail.exists():
    sys.exit(3)
(out / "complete").write_text(" ".join(sorted(p.name for p in out.iterdir())))
"""


def _step_stage(tmp: Path, tag: str, resumable: bool | None = None, resume_flag: bool = False) -> Stage:
    (tmp / "stepmod").mkdir(exist_ok=True)
    (tmp / "stepmod" / "g3n_test_step.py").write_text(STEP)
    return Stage("s", "a step", ["out/complete"], resumable=resumable, env={"PYTHONPATH": str(tmp / "stepmod")},
                 commands=lambda r: [["g3n_test_step", str(r / "out"), tag, str(tmp / "FAIL"),
                                      *(["--resume"] if resume_flag else [])]])


def _kill(tmp: Path, run: Path, stage: Stage) -> None:
    """Run the stage so that its command fails half way, as a killed stage would stop."""
    (tmp / "FAIL").touch()
    with pytest.raises(StageFailed, match="stage 's' failed"):
        run_stages(run, [stage], say=None)
    (tmp / "FAIL").unlink()
    assert (run / ".stages" / "s.running.json").is_file() and not (run / ".stages" / "s.json").exists()


def test_a_killed_stage_is_redone_not_kept(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    _kill(tmp_path, run, _step_stage(tmp_path, "old"))
    assert (run / "out" / "piece-old").is_file()  # the partial output of the killed attempt
    assert run_stages(run, [_step_stage(tmp_path, "old")]) == ["s"]
    assert "interrupted attempt (its commands do not resume)" in capsys.readouterr().out
    assert (run / "out" / "complete").read_text() == "piece-old"  # started over: nothing of the killed attempt
    assert not (run / ".stages" / "s.running.json").exists() and is_done(run, _step_stage(tmp_path, "old"))

    # killed with the old settings, re-run with new ones: the old partial outputs do not survive
    # under the new fingerprint, even for a stage whose commands resume
    run2 = tmp_path / "run2"
    run2.mkdir()
    _kill(tmp_path, run2, _step_stage(tmp_path, "old", resumable=True))
    assert run_stages(run2, [_step_stage(tmp_path, "new", resumable=True)]) == ["s"]
    assert "interrupted attempt with other settings (commands)" in capsys.readouterr().out
    assert (run2 / "out" / "complete").read_text() == "piece-new"
    log = (run2 / "logs" / "s.log").read_text()
    assert "# an interrupted attempt with other settings (commands): removed out" in log


def test_a_resumable_stage_killed_with_the_same_settings_keeps_its_outputs(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    stage = _step_stage(tmp_path, "a", resume_flag=True)  # resumable: its command takes --resume
    _kill(tmp_path, run, stage)
    (run / "out" / "piece-earlier").write_text("made before the kill")
    assert run_stages(run, [stage]) == ["s"]
    assert "resuming an interrupted attempt with the same settings" in capsys.readouterr().out
    assert (run / "out" / "complete").read_text() == "piece-a piece-earlier"  # kept for the command to continue

    # the same, but the packages were upgraded between the kill and the re-run: cleared, and said why
    run2 = tmp_path / "run2"
    run2.mkdir()
    _kill(tmp_path, run2, stage)
    (run2 / "out" / "piece-earlier").write_text("made before the kill")
    versions = runner.installed_versions()
    monkeypatch.setattr(runner, "installed_versions", lambda: {**versions, "torch": "0.1"})
    assert run_stages(run2, [stage]) == ["s"]
    assert f"other settings (versions (torch {versions['torch']} -> 0.1))" in capsys.readouterr().out
    assert (run2 / "out" / "complete").read_text() == "piece-a"


def test_outputs_without_any_marker_are_removed_and_removal_stays_in_the_run_folder(tmp_path):
    run = tmp_path / "run"
    (run / "out").mkdir(parents=True)
    (run / "out" / "piece-stale").write_text("left by a runner that kept no in-progress marker")
    assert run_stages(run, [_step_stage(tmp_path, "a")], say=None) == ["s"]
    assert (run / "out" / "complete").read_text() == "piece-a"

    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "keep.txt").write_text("not the stage's")
    (run / "link").symlink_to(outside)
    cmd = lambda r: [["json.tool", str(r / "settings.json")]]  # noqa: E731
    for owns in (["../precious"], [str(outside)], ["link/keep.txt"], [".stages"], ["."], [""]):
        with pytest.raises(ValueError, match="stage 'x'"):
            runner.clear_outputs(run, Stage("x", "x", ["o"], commands=cmd, owns=owns), keep=[run / ".stages"])
    with pytest.raises(ValueError, match="holds the runner's own"):
        runner.clear_outputs(run, Stage("x", "x", ["w/o"], commands=cmd, owns=["w"]), keep=[run / "w" / ".stages"])
    runner.clear_outputs(run, Stage("x", "x", ["link/keep.txt"], commands=cmd))  # a symlinked top: the link only
    assert not (run / "link").exists() and (outside / "keep.txt").is_file()


def test_demo_flags_override_the_config_file_and_only_when_given(tmp_path, monkeypatch):
    from g3n_pipeline import demo

    seen = []
    monkeypatch.setattr(demo, "run_demo", lambda cfg, force=False, until=None: seen.append(cfg))
    cfg_file = tmp_path / "demo.yaml"
    cfg_file.write_text(f"run_dir: {tmp_path / 'from-config'}\nsubjects: 40\n")
    assert demo.main(["--config", str(cfg_file)]) == 0
    assert seen[-1].run_dir == tmp_path / "from-config" and seen[-1].subjects == 40  # no flag: the file's run_dir
    assert demo.main(["--config", str(cfg_file), "--run-dir", str(tmp_path / "flag"), "--subjects", "30"]) == 0
    assert seen[-1].run_dir == tmp_path / "flag" and seen[-1].subjects == 30
    assert demo.main(["--config", str(cfg_file), "--seed", "7"]) == 0
    assert seen[-1].seed == 7 and seen[-1].subjects == 40
    assert demo.main([]) == 0
    assert seen[-1].run_dir == demo.DemoConfig().run_dir and seen[-1].seed == demo.DemoConfig().seed


def test_signal_config_is_a_demo_config_with_three_times_the_glioma_subjects(monkeypatch):
    """configs/signal/cohort-300.yaml validates as a DemoConfig, its cohort has 60 glioma subjects, and
    a run of the whole chain measures the anatomy on reconstructions too."""
    from pathlib import Path

    from g3n_data.synth.config import SynthConfig
    from g3n_data.synth.design import plan_cohort
    from g3n_pipeline import demo

    path = Path(__file__).resolve().parents[3] / "configs" / "signal" / "cohort-300.yaml"
    seen = []
    monkeypatch.setattr(demo, "run_demo", lambda cfg, force=False, until=None: seen.append((cfg, until)))
    assert demo.main(["--config", str(path), "--seed", "1", "--until", "probe"]) == 0
    cfg, until = seen[-1]
    assert cfg.subjects == 300 and cfg.seed == 1 and until == "probe" and cfg.probe_permutations >= 99
    assert cfg.anatomy_recon
    glioma = [p for p in plan_cohort(SynthConfig(subjects=cfg.subjects, seed=cfg.seed)) if p.cohort == "SYN-GLIOMA"]
    assert len(glioma) == 60 and sum(p.idh1 == "mutant" for p in glioma) == 21


def test_the_evaluation_decodes_the_anatomy_modalities_and_the_held_out_volumes(tmp_path):
    """recon_keys: the first visit of each subject in the anatomy effects' modalities (which must be
    the synthetic spec's), plus the first N held-out keys; a held-out key with no latent fails the stage."""
    import numpy as np
    import pytest

    import g3n_shards as gs
    from g3n_data.synth import load_config
    from g3n_data.synth.anatomy import anatomy_spec
    from g3n_pipeline.demo import ANATOMY_MODALITIES, recon_keys
    from g3n_pipeline.runner import StageFailed

    spec, _ = anatomy_spec(load_config(None, "demo"))
    assert {e["modality"] for e in spec["effects"]} <= set(ANATOMY_MODALITIES)

    def write(path, items):
        with gs.ShardWriter(path, kind="volumes", producer=gs.Producer(package="test"),
                            geometry=gs.Geometry(shape=(4, 4, 4), spacing=(2.0, 2.0, 2.0))) as w:
            for key, mod, *age in items:
                w.write(key, {"subject": key[:2], "modality": mod, "age": (age or [None])[0]},
                        {"volume": np.ones((4, 4, 4), np.float32)})
        return path

    items = [("s1-t1", "T1", 70.0), ("s1-t1-later", "T1", 73.0), ("s1-t2", "T2"), ("s2-fl", "FLAIR"), ("s2-t1c", "T1c"),
             ("s3-t2", "T2"), ("s3-t1-2", "T1", 61.5), ("s3-t1", "T1", 60.0)]
    latents = write(tmp_path / "all", items)
    heldout = write(tmp_path / "test", [("s2-fl", "FLAIR"), ("s3-t2", "T2"), ("s3-t1", "T1")])
    assert recon_keys(latents, heldout, ("T1", "T1c"), 1) == ["s1-t1", "s2-fl", "s2-t1c", "s3-t1"]
    assert recon_keys(latents, heldout, ("T1", "T1c"), 5) == ["s1-t1", "s2-fl", "s2-t1c", "s3-t1", "s3-t2"]
    other = write(tmp_path / "other", [("s9-t2", "T2")])
    with pytest.raises(StageFailed, match="s9-t2"):
        recon_keys(latents, other, ("T1",), 5)


def test_forecast_lines_say_n_a_where_a_figure_is_nan(tmp_path):
    """NaN is written to JSON as null: the headline prints n/a instead of failing at the end of a run."""
    import json

    from g3n_pipeline.headline import forecast_lines

    paired = {"n_groups": 8, "n_moved": 2, "mean_slope": -0.002, "p": 0.96}
    doc = {"results": {"anatomy": {"age:30->70 [T1]": {
        "signature": "ventricle_signal", "expect": "decrease", "slope": -0.002, "recovered": None, "paired": paired,
        "real_followups": {"n_groups": 11, "n_moved": 4, "mean_change_per_year": None, "p": 0.89}}}}}
    (tmp_path / "eval" / "forecast").mkdir(parents=True)
    (tmp_path / "eval" / "forecast" / "forecast.json").write_text(json.dumps(doc))
    (line,) = forecast_lines(tmp_path)
    assert "2/8 moved" in line and "n/a/y" in line and "forecasts n/a of that rate" in line


def test_commands_start_with_the_malloc_settings_unless_the_environment_sets_them(tmp_path, monkeypatch):
    from g3n_pipeline.runner import MALLOC_ENV

    (tmp_path / "envmod").mkdir()
    (tmp_path / "envmod" / "g3n_test_env.py").write_text(
        "import json, os, sys\nopen(sys.argv[1], 'w').write(json.dumps({k: os.environ.get(k) for k in sys.argv[2:]}))\n")
    names = sorted(MALLOC_ENV)

    def stage(out: str) -> Stage:
        return Stage(out, "print the environment", [out], env={"PYTHONPATH": str(tmp_path / "envmod")},
                     commands=lambda r: [["g3n_test_env", str(r / out), *names]])

    run = tmp_path / "run"
    run.mkdir()
    for k in names:
        monkeypatch.delenv(k, raising=False)
    run_stages(run, [stage("default")], say=None)
    assert json.loads((run / "default").read_text()) == MALLOC_ENV
    monkeypatch.setenv(names[0], "65536")  # a user's own setting wins
    run_stages(run, [stage("own")], say=None)
    assert json.loads((run / "own").read_text()) == {**MALLOC_ENV, names[0]: "65536"}
