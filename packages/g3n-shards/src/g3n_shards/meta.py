"""Sample metadata: one validated model for every volume, token set or latent in BrainG3N.

Unknown is ``None``, never a sentinel number: a probe or a condition embedding must be able
to tell "not recorded" from a real value. Unknown columns of a source table are kept in
``extra`` (never silently dropped); unknown *fields* are refused so that a typo such as
``agee`` does not pass unnoticed.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import MetadataError

Modality = Literal["T1", "T2", "FLAIR", "T1c"]
MODALITIES: tuple[str, ...] = ("T1", "T2", "FLAIR", "T1c")
Sex = Literal["F", "M"]
Handedness = Literal["R", "L", "A"]
IDH1 = Literal["wildtype", "mutant"]
MGMT = Literal["methylated", "unmethylated"]

#: Default diagnosis vocabulary (docs/method.md §1). Other labels are allowed; the manifest of a set
#: records the vocabulary it actually uses.
DIAGNOSES: tuple[str, ...] = ("HC", "MCI", "AD", "PD", "GBM", "glioma", "ASD", "ADHD", "SCZ", "paediatric-mixed")
CDR_VALUES: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 3.0)

_APOE = re.compile(r"^e([234])/e([234])$")
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
ExtraValue = str | int | float | bool | None


class SampleMeta(BaseModel):
    """Everything known about one sample. Field names are the probe panel's target names."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # identity
    subject: str = Field(min_length=1, max_length=128)
    session: str | None = Field(default=None, max_length=128)
    cohort: str | None = Field(default=None, max_length=128)
    site: str | None = Field(default=None, max_length=128)
    modality: Modality
    # demographics and acquisition
    age: float | None = Field(default=None, ge=0, le=120, description="years at this session")
    sex: Sex | None = None
    diagnosis: str | None = Field(default=None, min_length=1, max_length=64)
    field_strength: float | None = Field(default=None, gt=0, le=21, description="tesla")
    vendor: str | None = Field(default=None, max_length=64)
    handedness: Handedness | None = None
    ethnicity: str | None = Field(default=None, max_length=64)
    race: str | None = Field(default=None, max_length=64)
    # genetics and tumour
    apoe_genotype: str | None = Field(default=None, description="e.g. 'e3/e4'")
    apoe_e4_carrier: bool | None = None
    idh1: IDH1 | None = None
    mgmt: MGMT | None = None
    tumour_grade: Literal[1, 2, 3, 4] | None = None
    # cognition and clinical scales
    cdr: float | None = None
    mmse: float | None = Field(default=None, ge=0, le=30)
    moca: float | None = Field(default=None, ge=0, le=30)
    education: float | None = Field(default=None, ge=0, le=30, description="years")
    gds: float | None = Field(default=None, ge=0, le=30)
    updrs3: float | None = Field(default=None, ge=0, le=132)
    scopa_aut: float | None = Field(default=None, ge=0, le=69)
    # kept, never dropped: columns of the source that have no field here
    extra: dict[str, ExtraValue] = Field(default_factory=dict)
    # provenance
    source_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    synthetic: bool = False
    request: dict[str, Any] | None = Field(default=None, description="generation request of a synthetic sample")

    @field_validator("subject")
    @classmethod
    def _subject_safe(cls, v: str) -> str:
        if not _SAFE_ID.match(v):
            raise ValueError("must start with a letter or digit and contain only letters, digits, '_', '.', '+', '-'")
        return v

    @field_validator("apoe_genotype")
    @classmethod
    def _apoe_canonical(cls, v: str | None) -> str | None:
        if v is None:
            return None
        m = _APOE.match(v.strip().lower().replace(" ", ""))
        if not m:
            raise ValueError("must look like 'e3/e4' (alleles e2, e3, e4)")
        a, b = sorted((m.group(1), m.group(2)))
        return f"e{a}/e{b}"

    @field_validator("cdr")
    @classmethod
    def _cdr_scale(cls, v: float | None) -> float | None:
        if v is not None and float(v) not in CDR_VALUES:
            raise ValueError(f"must be one of {CDR_VALUES}")
        return v

    @model_validator(mode="after")
    def _apoe_consistent(self) -> "SampleMeta":
        if self.apoe_genotype is not None:
            carrier = "4" in self.apoe_genotype
            if self.apoe_e4_carrier is None:
                # object.__setattr__ avoids re-running validation on assignment
                object.__setattr__(self, "apoe_e4_carrier", carrier)
            elif self.apoe_e4_carrier != carrier:
                raise ValueError(
                    f"apoe_e4_carrier={self.apoe_e4_carrier} contradicts apoe_genotype={self.apoe_genotype!r}"
                )
        return self

    @classmethod
    def validate_record(cls, record: dict[str, Any], source: str | None = None) -> "SampleMeta":
        """Validate a plain dict; on failure raise MetadataError naming each field and value."""
        try:
            return cls.model_validate(record)
        except ValidationError as e:
            raise MetadataError(format_validation_error(e, source)) from None


def format_validation_error(e: ValidationError, source: str | None = None) -> str:
    """One line per problem: ``field 'age': value -3 -> Input should be >= 0``."""
    where = f"{source}: " if source else ""
    lines = []
    for err in e.errors():
        field = ".".join(str(p) for p in err.get("loc", ())) or "<record>"
        value = err.get("input")
        if isinstance(value, dict) and field != "<record>":
            value = "{...}"
        lines.append(f"field '{field}': value {value!r} -> {err.get('msg')}")
    return where + "invalid metadata: " + "; ".join(lines)


_KEY_CHARS = re.compile(r"[^a-z0-9_-]+")


def sanitize_key(text: str) -> str:
    """Lower-case, keep [a-z0-9_-]; WebDataset splits keys at the first '.', so dots must go."""
    out = _KEY_CHARS.sub("-", text.lower()).strip("-")
    return re.sub(r"-{2,}", "-", out)


def sample_key(meta: SampleMeta, suffix: str | None = None) -> str:
    """Deterministic key from identity fields: ``cohort-subject-session-modality[-suffix]``."""
    parts = [meta.cohort or "", meta.subject, meta.session or "", meta.modality]
    if suffix:
        parts.append(suffix)
    return sanitize_key("-".join(p for p in parts if p))
