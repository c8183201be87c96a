import csv
import json
import math

from g3n_tokenizer.sweep import SweepConfig, run_sweep


def test_sweep_writes_table5(tmp_path, volumes_set, mae_checkpoint):
    cfg = SweepConfig(preset="test", c_values=[4, None], autoencoderkl=True, test_fraction=0.25, probe_protocol="tiny",
                      overrides={"train": {"max_epochs": 1, "steps_per_epoch": 2}})
    rows = run_sweep(volumes_set, mae_checkpoint, tmp_path / "sweep", cfg, progress=False)
    assert [r["tokenizer"] for r in rows] == ["MAE c=4", "MAE no projection (48)", "AutoencoderKL"]
    assert [r["values_per_volume"] for r in rows] == [64 * 4, 64 * 48, 512 * 4]
    for r in rows:
        assert r["mse"] > 0 and math.isfinite(r["psnr"]) and -1 <= r["ssim"] <= 1
        assert 0 <= r["idh1_auc"] <= 1 and 0 <= r["tumour_grade_auc"] <= 1
    with open(tmp_path / "sweep" / "table5.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["tokenizer", "values_per_volume", "mse", "psnr", "ssim", "idh1_auc", "tumour_grade_auc"]
    assert len(table) == 3
    md = (tmp_path / "sweep" / "table5.md").read_text()
    assert "| MAE c=4 | 256 |" in md and "AutoencoderKL" in md
    doc = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert doc["splits"]["test"] == 3 and len(doc["arms"]) == 3
    assert all(a["checkpoint_digest"] for a in doc["arms"])
