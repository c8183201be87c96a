import pytest

import g3n_shards as gs


def test_unknown_is_none_and_apoe_derived():
    m = gs.SampleMeta(subject="s1", modality="T1", apoe_genotype="E4/e3")
    assert m.age is None and m.cdr is None and m.idh1 is None
    assert m.apoe_genotype == "e3/e4" and m.apoe_e4_carrier is True
    assert gs.SampleMeta(subject="s1", modality="T1", apoe_genotype="e3/e3").apoe_e4_carrier is False


@pytest.mark.parametrize(
    "field,value",
    [("age", -3), ("modality", "DWI"), ("sex", "X"), ("cdr", 0.7), ("mmse", 31), ("apoe_genotype", "e5/e3"),
     ("subject", "../etc"), ("idh1", "maybe"), ("agee", 5)],
)
def test_validation_error_names_field_and_value(field, value):
    rec = {"subject": "s1", "modality": "T1", field: value}
    with pytest.raises(gs.MetadataError) as e:
        gs.SampleMeta.validate_record(rec, source="participants.tsv:4")
    msg = str(e.value)
    assert f"'{field}'" in msg and repr(value) in msg and "participants.tsv:4" in msg


def test_contradicting_apoe_refused():
    with pytest.raises(gs.MetadataError, match="apoe_e4_carrier"):
        gs.SampleMeta.validate_record({"subject": "s", "modality": "T1", "apoe_genotype": "e3/e3", "apoe_e4_carrier": True})


def test_sample_key_deterministic_and_safe():
    m = gs.SampleMeta(subject="IXI002-Guys.0828", session="ses-1", cohort="IXI", modality="T1c")
    assert gs.sample_key(m) == "ixi-ixi002-guys-0828-ses-1-t1c"
    assert gs.sample_key(m) == gs.sample_key(m.model_copy())
    assert "." not in gs.sample_key(m)


def test_extra_and_provenance_kept():
    m = gs.SampleMeta(subject="s", modality="FLAIR", extra={"scanner_room": "B", "x": 1.5}, synthetic=True,
                      request={"diagnosis": "AD", "seed": 3}, source_sha256="a" * 64)
    again = gs.SampleMeta.model_validate(m.model_dump(mode="json"))
    assert again == m
