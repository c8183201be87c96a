"""Ingest: BIDS (participants + sessions files, column mapping), CSV manifests, DICOM series."""

from __future__ import annotations

import json
import locale
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: make the helpers importable
from datahelpers import TCGA, TCGA_FILES, ixi_demographics, ixi_paths, link  # noqa: E402

from g3n_data.columns import ColumnMapping  # noqa: E402
from g3n_data.images import keep_locale  # noqa: E402
from g3n_data.ingest import ingest_bids, ingest_dicom, run_ingest  # noqa: E402
from g3n_data.worklist import read_worklist  # noqa: E402


def make_bids(root: Path) -> Path:
    """Two IXI subjects, the 4-modality TCGA session, plus files ingest must reject."""
    ixi = ixi_paths()
    link(ixi[0], root / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    link(ixi[1], root / "sub-02" / "ses-a" / "anat" / "sub-02_ses-a_T1w.nii.gz")
    link(ixi[1], root / "sub-02" / "ses-b" / "anat" / "sub-02_ses-b_run-1_T1w.nii.gz")
    link(ixi[2], root / "sub-02" / "ses-b" / "anat" / "sub-02_ses-b_run-2_T1w.nii.gz")
    link(ixi[3], root / "sub-02" / "ses-b" / "anat" / "sub-02_ses-b_T2starw.nii.gz")  # unsupported
    t = root / "sub-03" / "ses-1" / "anat"
    link(TCGA / TCGA_FILES["T1"], t / "sub-03_ses-1_T1w.nii.gz")
    link(TCGA / TCGA_FILES["T1c"], t / "sub-03_ses-1_ce-gadolinium_T1w.nii.gz")
    link(TCGA / TCGA_FILES["T2"], t / "sub-03_ses-1_T2w.nii.gz")
    link(TCGA / TCGA_FILES["FLAIR"], t / "sub-03_ses-1_FLAIR.nii.gz")
    link(ixi[4], root / "sub-04" / "anat" / "sub-04_T1w.nii.gz")  # age fails validation
    (root / "participants.tsv").write_text(
        "participant_id\tAgeAtScan\tGender\tHandedness\tgroup\tscanner_room\n"
        "sub-01\t38.5\tmale\t1\tcontrol\tA\n"
        "02\tn/a\tF\t-75\tHC\tB\n"
        "sub-03\t51\t2\tright\tGBM\tn/a\n"
        "sub-04\t-3\tM\tR\tHC\tC\n"
        "sub-99\t40\tM\tR\tHC\tD\n"
    )
    (root / "sub-02" / "sub-02_sessions.tsv").write_text("session_id\tage\tmmse\nses-a\t60.25\t29\nb\t62.5\t27\n")
    return root


def test_bids_ingest_maps_columns_and_sessions(tmp_path):
    res = ingest_bids(make_bids(tmp_path / "ds"), ColumnMapping(cohort="Demo", site="S1"))
    by_key = {i.key: i for i in res.items}
    assert sorted(by_key) == [
        "demo-sub-01-t1", "demo-sub-02-ses-a-t1", "demo-sub-02-ses-b-t1-run-1", "demo-sub-02-ses-b-t1-run-2",
        "demo-sub-03-ses-1-flair", "demo-sub-03-ses-1-t1", "demo-sub-03-ses-1-t1c", "demo-sub-03-ses-1-t2",
    ]
    m1 = by_key["demo-sub-01-t1"].meta
    assert (m1["age"], m1["sex"], m1["handedness"], m1["diagnosis"], m1["site"]) == (38.5, "M", "R", "HC", "S1")
    assert m1["extra"] == {"scanner_room": "A"}  # unknown column kept, not dropped
    assert len(m1["source_sha256"]) == 64
    a, b = by_key["demo-sub-02-ses-a-t1"].meta, by_key["demo-sub-02-ses-b-t1-run-1"].meta
    assert (a["age"], b["age"], a["mmse"], b["mmse"]) == (60.25, 62.5, 29, 27)  # per-session values
    assert (a["sex"], a["handedness"]) == ("F", "L")  # 'F'; laterality quotient -75 -> L
    t1c = by_key["demo-sub-03-ses-1-t1c"].meta
    assert (t1c["modality"], t1c["sex"], t1c["diagnosis"], t1c["age"]) == ("T1c", "F", "GBM", 51.0)
    assert t1c["extra"] == {}  # n/a is missing, not a value
    reasons = {(Path(r["path"]).name, r["step"]): r["reason"] for r in res.rejects}
    assert "unsupported image suffix 'T2starw'" in reasons[("sub-02_ses-b_T2starw.nii.gz", "ingest")]
    bad_age = reasons[("sub-04_T1w.nii.gz", "metadata")]
    assert "age" in bad_age and "-3" in bad_age
    rep = res.report
    assert rep["columns"]["AgeAtScan"] == "age" and rep["columns"]["Gender"] == "sex"
    assert rep["kept_in_extra"] == ["scanner_room"]
    assert rep["participants_without_images"] == ["sub-99"]
    assert "sex: male -> M" in rep["value_conversions"]
    assert len(res.items) + len(res.rejects) == 10  # every image found is accounted for


def test_bids_unknown_columns_refused_with_a_clear_message(tmp_path):
    res = ingest_bids(make_bids(tmp_path / "ds"), ColumnMapping(unknown_columns="refuse"))
    assert not res.items
    assert all("unknown column 'scanner_room'" in r["reason"] for r in res.rejects if r["step"] == "metadata"
               and "sub-04" not in r["path"])
    # mapping the column (or marking it ignored) lets the rows through
    ok = ingest_bids(tmp_path / "ds", ColumnMapping(unknown_columns="refuse", columns={"scanner_room": "ignore"}))
    assert len(ok.items) == 8


def test_custom_column_mapping_and_codes(tmp_path):
    root = tmp_path / "ds"
    link(ixi_paths()[0], root / "sub-7" / "anat" / "sub-7_T1w.nii.gz")
    (root / "participants.tsv").write_text("participant_id\tyrs\tsx\tdx\nsub-7\t400\tX\tProbable AD\n")
    mp = ColumnMapping(columns={"yrs": "age", "sx": "sex", "dx": "diagnosis"}, age_unit="months",
                       sex_values={"x": "F"}, diagnosis_values={"probable ad": "AD"})
    res = ingest_bids(root, mp)
    assert not res.rejects
    meta = res.items[0].meta
    assert meta["age"] == pytest.approx(400 / 12) and meta["sex"] == "F" and meta["diagnosis"] == "AD"
    # an unknown code is refused, naming file, row, column and value
    bad = ingest_bids(root, ColumnMapping(columns={"yrs": "age", "sx": "sex", "dx": "diagnosis"}))
    assert "participants.tsv:2" in bad.rejects[0]["reason"] and "'X'" in bad.rejects[0]["reason"]


def test_csv_manifest_ingest(tmp_path):
    ixi = ixi_paths()
    demog = ixi_demographics()
    rows = ["path,MRID,Age,Sex,scanner"]
    for p in ixi[:3]:
        mrid = p.name.replace("-T1_ds.nii.gz", "")
        rows.append(f"{p},{mrid},{demog[mrid][0]},{demog[mrid][1]},Philips")
    (tmp_path / "local.nii.gz").symlink_to(ixi[3])
    rows.append("local.nii.gz,IXI033-HH-1259,24.76,M,GE")  # relative to the CSV
    rows.append("missing.nii.gz,IXI999,30,M,GE")  # file not found -> reject
    rows.append(f"{ixi[4]},IXI034-HH-1260,24.34,Q,GE")  # unknown sex code -> reject
    csv = tmp_path / "ixi.csv"
    csv.write_text("\n".join(rows) + "\n")
    out = tmp_path / "wl"
    res = run_ingest("csv", csv, out, ColumnMapping(cohort="IXI", site="IXI-HH"))
    assert len(res.items) == 4 and len(res.rejects) == 2
    items, rejects = read_worklist(out)
    m = {i.key: i.meta for i in items}["ixi-ixi012-hh-1211-t1"]
    assert (m["age"], m["sex"], m["site"], m["modality"], m["extra"]) == (38.78, "M", "IXI-HH", "T1", {"scanner": "Philips"})
    assert {r["reason"].split(": ", 1)[1] for r in rejects if r["step"] == "ingest"} == {"file not found"}
    assert json.loads((out / "ingest_report.json").read_text())["columns"]["MRID"] == "subject"


def _write_dicom_series(vol: sitk.Image, folder: Path, description: str, uid: str,
                        extra_tags: dict[str, str] | None = None) -> None:
    """Write a 3D image as a DICOM series (one file per slice) with SimpleITK/GDCM."""
    with keep_locale():  # GDCM leaves the process in the plain "C" locale
        _write_dicom_series_unguarded(vol, folder, description, uid, extra_tags or {})


def _write_dicom_series_unguarded(vol: sitk.Image, folder: Path, description: str, uid: str,
                                  extra_tags: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    img = sitk.Cast(sitk.RescaleIntensity(vol, 0, 2000), sitk.sitkInt16)
    w = sitk.ImageFileWriter()
    w.KeepOriginalImageUIDOn()
    direction = img.GetDirection()
    for k in range(img.GetDepth()):
        sl = img[:, :, k]
        tags = {
            "0008|0060": "MR", "0008|103e": description, "0010|0010": "Doe^Jane", "0010|0030": "19500101",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1", "0020|000e": uid,
            "0020|0032": "\\".join(map(str, img.TransformIndexToPhysicalPoint((0, 0, k)))),
            "0020|0037": "\\".join(map(str, direction[0:7:3] + direction[1:8:3])),
            "0020|0013": str(k + 1), "0008|0018": f"{uid}.{k + 1}",
            **extra_tags,
        }
        for t, v in tags.items():
            sl.SetMetaData(t, v)
        w.SetFileName(str(folder / f"im{k:03d}.dcm"))
        w.Execute(sl)


def test_dicom_series_are_converted_without_identifying_tags(tmp_path):
    before = locale.setlocale(locale.LC_ALL)
    src, _ = sitk.ReadImage(str(ixi_paths()[0])), None
    src = sitk.DICOMOrient(src[:, :, 30:50], "LPS")
    root = tmp_path / "dicom"
    _write_dicom_series(src, root / "subjA" / "ses-1" / "s1", "T1 MPRAGE SAG", "1.2.826.0.1.3680043.2.1125.11")
    _write_dicom_series(src, root / "subjA" / "ses-1" / "s2", "localizer", "1.2.826.0.1.3680043.2.1125.12")
    (root / "subjA" / "notes.txt").write_text("not dicom")
    table = tmp_path / "meta.csv"
    table.write_text("subject,age,sex\nsubjA,44,F\n")
    res = ingest_dicom(root, tmp_path / "wl", ColumnMapping(cohort="D"), table=table)
    assert [i.key for i in res.items] == ["d-subja-ses-1-t1"]
    item = res.items[0]
    assert (item.meta["age"], item.meta["sex"], item.meta["session"]) == (44.0, "F", "ses-1")
    conv = sitk.ReadImage(item.path)
    assert conv.GetSize() == src.GetSize()
    np.testing.assert_allclose(conv.GetSpacing(), src.GetSpacing(), atol=1e-3)
    np.testing.assert_allclose(conv.GetOrigin(), src.GetOrigin(), atol=1e-2)
    text = json.dumps(item.meta) + Path(item.path).read_bytes().decode("latin-1")
    assert "Doe" not in text and "19500101" not in text  # no names or dates copied
    reasons = sorted(r["reason"] for r in res.rejects)
    assert reasons == ["file is not part of a readable DICOM series", "series description names no supported modality"]
    assert locale.setlocale(locale.LC_ALL) == before  # GDCM's locale change does not leak


def _small_volume() -> sitk.Image:
    """A tiny synthetic 3D image (no real data needed): enough for a 3-slice DICOM series."""
    arr = np.random.default_rng(3).random((3, 12, 10)).astype(np.float32)  # (z, y, x)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.0, 1.0, 2.0))
    img.SetOrigin((-5.0, 7.0, 11.0))
    return img


def test_dicom_age_and_sex_from_tags_when_the_table_gives_none(tmp_path):
    vol = _small_volume()
    root = tmp_path / "dicom"
    ident = {"0010|0020": "PID-12345", "0008|0080": "St Elsewhere Hospital", "0008|0020": "20240102",
             "0008|1030": "Brain study of Jane"}  # identifying: must never reach metadata or files
    series = {  # subject: (PatientAge, PatientSex)
        "s1": ("065Y", "F"),   # no table row: both from the tags
        "s2": ("006M", "M"),   # table gives age only: age from the table, sex from the tag
        "s3": ("010W", "O"),   # weeks; "O" (other) stays unknown
        "s4": ("030D", ""),    # days; empty sex tag is simply unknown
        "s5": ("6 years", "X"),  # malformed: warnings naming the file, fields unknown, volume kept
        "s6": ("", ""),        # table gives both; empty tags
    }
    for n, (sub, (age, sex)) in enumerate(sorted(series.items())):
        _write_dicom_series(vol, root / sub / "t1", "T1 MPRAGE", f"1.2.826.0.1.3680043.2.1125.2{n}",
                            {"0010|1010": age, "0010|0040": sex, **ident})
    table = tmp_path / "meta.csv"
    table.write_text("subject,age,sex\ns2,44,\ns6,70.5,F\n")
    out = tmp_path / "wl"
    res = run_ingest("dicom", root, out, ColumnMapping(cohort="D"), table=table)
    assert not res.rejects
    meta = {i.meta["subject"]: i.meta for i in res.items}
    got = {s: (m["age"], m["sex"]) for s, m in meta.items()}
    assert got["s1"] == (65.0, "F")
    assert got["s2"] == (44.0, "M")  # the table wins for age
    assert got["s3"] == (pytest.approx(70 / 365.25, abs=1e-4), None)
    assert got["s4"] == (pytest.approx(30 / 365.25, abs=1e-4), None)
    assert got["s5"] == (None, None)
    assert got["s6"] == (70.5, "F")
    rep = json.loads((out / "ingest_report.json").read_text())
    src = {k.split("-")[1]: v for k, v in rep["metadata_sources"]["per_sample"].items()}
    assert src["s1"] == {"age": "dicom", "sex": "dicom"}
    assert src["s2"] == {"age": "table", "sex": "dicom"}
    assert src["s3"] == {"age": "dicom", "sex": None}
    assert src["s5"] == {"age": None, "sex": None}
    assert src["s6"] == {"age": "table", "sex": "table"}
    assert rep["metadata_sources"]["counts"]["age"] == {"table": 2, "dicom": 3, "none": 1}
    assert rep["metadata_sources"]["sex_other_left_unknown"] == 1
    warns = sorted((w["field"], w["reason"]) for w in rep["warnings"])
    assert [f for f, _ in warns] == ["age", "sex"]
    assert all(str(root / "s5" / "t1") in r for _, r in warns)  # names the file
    assert "'6 years'" in warns[0][1] and "'X'" in warns[1][1]
    assert "warning" in res.summary()
    # nothing identifying was copied: metadata, work list, report and converted files
    text = (out / "worklist.jsonl").read_text() + json.dumps(rep)
    text += "".join(Path(i.path).read_bytes().decode("latin-1") for i in res.items)
    for bad in ("Doe", "19500101", "PID-12345", "Elsewhere", "20240102", "Jane"):
        assert bad not in text


@pytest.mark.parametrize("value, years", [("065Y", 65.0), ("006M", 0.5), ("010W", 70 / 365.25),
                                          ("030D", 30 / 365.25), (" 65Y ", 65.0), ("", None)])
def test_parse_dicom_age(value, years):
    from g3n_data.ingest import parse_dicom_age

    assert parse_dicom_age(value) == (None if years is None else pytest.approx(years, abs=1e-4))


@pytest.mark.parametrize("value", ["65", "65 years", "Y065", "-05Y", "200Y", "1e2Y", "065X"])
def test_parse_dicom_age_refuses_malformed(value):
    from g3n_data.ingest import DicomTagError, parse_dicom_age

    with pytest.raises(DicomTagError, match="PatientAge"):
        parse_dicom_age(value)


def test_parse_dicom_sex():
    from g3n_data.ingest import DicomTagError, parse_dicom_sex

    assert [parse_dicom_sex(v) for v in ("M", "f ", "O", "")] == [("M", False), ("F", False), (None, True),
                                                                   (None, False)]
    with pytest.raises(DicomTagError, match="PatientSex 'male'"):
        parse_dicom_sex("male")


def test_value_codes():
    from g3n_data.columns import Mapper, TableError

    m = Mapper(ColumnMapping())
    vals, extra = m.map_row(
        {"sex": "female", "hand": "40", "Modality": "T1-ce", "WHO grade": "IV", "APOE": "e4/e3", "IDH": "wt",
         "MGMT status": "methylated", "field strength": "3T", "visit_note": "ok", "cdr": "0.5"}, "t:2")
    assert vals == {"sex": "F", "handedness": "R", "modality": "T1c", "tumour_grade": 4, "apoe_genotype": "e4/e3",
                    "idh1": "wildtype", "mgmt": "methylated", "field_strength": 3.0, "cdr": 0.5}
    assert extra == {"visit_note": "ok"}
    with pytest.raises(TableError, match="t:3.*handedness.*'sideways'"):
        m.map_row({"handedness": "sideways"}, "t:3")
