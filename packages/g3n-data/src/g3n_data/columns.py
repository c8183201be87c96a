"""Mapping metadata tables (participants.tsv, sessions files, CSV manifests) onto SampleMeta.

Every cohort spells its table differently: ``age_at_scan`` for age, sex as M/F/male/female/1/2,
handedness as a word or a number. A :class:`ColumnMapping` (config) names source columns per
field and value codes; well-known aliases are recognised without config. Unknown columns are
kept in ``extra`` (default) or refused with a clear message (``unknown_columns: refuse``), never
dropped. :class:`MappingReport` records what was mapped so the ingest report can show it.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from g3n_shards import SampleMeta
from pydantic import BaseModel, ConfigDict, Field

META_FIELDS = tuple(f for f in SampleMeta.model_fields if f not in ("extra", "source_sha256", "synthetic", "request"))

#: Column names recognised without config (lower-case, separators removed), per field.
ALIASES: dict[str, tuple[str, ...]] = {
    "subject": ("participantid", "subject", "subjectid", "sub", "subjid", "mrid", "id"),
    "session": ("sessionid", "session", "ses", "visit", "visitid"),
    "age": ("age", "ageyears", "ageatscan", "ageatscanyears", "ageatvisit", "scanage"),
    "sex": ("sex", "gender"),
    "diagnosis": ("diagnosis", "dx", "group", "diagnosisgroup", "dxgroup"),
    "site": ("site", "sitename", "scansite", "institution"),
    "field_strength": ("fieldstrength", "magneticfieldstrength", "tesla"),
    "vendor": ("vendor", "manufacturer", "scannervendor", "scannermanufacturer"),
    "handedness": ("handedness", "hand", "handed"),
    "ethnicity": ("ethnicity",),
    "race": ("race",),
    "apoe_genotype": ("apoegenotype", "apoe", "genotype"),
    "apoe_e4_carrier": ("apoee4carrier", "apoe4", "e4carrier"),
    "idh1": ("idh1", "idh", "idhstatus", "idh1status"),
    "mgmt": ("mgmt", "mgmtstatus", "mgmtmethylation"),
    "tumour_grade": ("tumourgrade", "tumorgrade", "grade", "whograde"),
    "cdr": ("cdr", "cdrglobal", "globalcdr"),
    "mmse": ("mmse",),
    "moca": ("moca",),
    "education": ("education", "educationyears", "educ", "yearsofeducation", "ptedu"),
    "gds": ("gds", "gdscale"),
    "updrs3": ("updrs3", "updrsiii", "updrspart3", "nupdrs3"),
    "scopa_aut": ("scopaaut", "scopa"),
    "cohort": ("cohort", "dataset", "study"),
    "modality": ("modality",),
}

DEFAULT_NA = ("", "n/a", "na", "nan", "none", "null", "-", "?", "unknown", "missing", "-999", "-9999", "999")


class ColumnMapping(BaseModel):
    """Config for reading one cohort's tables (YAML/JSON). Anything not set falls back to aliases."""

    model_config = ConfigDict(extra="forbid")
    cohort: str | None = None
    site: str | None = None
    #: source column -> SampleMeta field (wins over aliases); map a column to "ignore" to mark it handled
    columns: dict[str, str] = Field(default_factory=dict)
    sex_values: dict[str, Literal["F", "M"]] = Field(default_factory=lambda: {
        "f": "F", "female": "F", "w": "F", "woman": "F", "2": "F",
        "m": "M", "male": "M", "man": "M", "1": "M"})
    handedness_values: dict[str, Literal["R", "L", "A"]] = Field(default_factory=lambda: {
        "r": "R", "right": "R", "rh": "R", "1": "R", "l": "L", "left": "L", "lh": "L", "2": "L",
        "a": "A", "ambidextrous": "A", "ambi": "A", "both": "A", "mixed": "A", "3": "A"})
    #: a numeric handedness not in the codes above is an Edinburgh laterality quotient (-100..100)
    laterality_cutoff: float = 40.0
    diagnosis_values: dict[str, str] = Field(default_factory=lambda: {
        "cn": "HC", "control": "HC", "controls": "HC", "healthy": "HC", "hc": "HC", "nc": "HC", "normal": "HC",
        "mci": "MCI", "emci": "MCI", "lmci": "MCI", "ad": "AD", "dementia": "AD", "pd": "PD", "parkinson": "PD",
        "gbm": "GBM", "asd": "ASD", "autism": "ASD", "adhd": "ADHD", "scz": "SCZ", "schizophrenia": "SCZ"})
    idh1_values: dict[str, str] = Field(default_factory=lambda: {
        "wildtype": "wildtype", "wt": "wildtype", "wild-type": "wildtype", "0": "wildtype", "negative": "wildtype",
        "mutant": "mutant", "mut": "mutant", "mutated": "mutant", "1": "mutant", "positive": "mutant"})
    mgmt_values: dict[str, str] = Field(default_factory=lambda: {
        "methylated": "methylated", "1": "methylated", "positive": "methylated", "m": "methylated",
        "unmethylated": "unmethylated", "0": "unmethylated", "negative": "unmethylated", "u": "unmethylated"})
    modality_values: dict[str, Literal["T1", "T2", "FLAIR", "T1c"]] = Field(default_factory=lambda: {
        "t1": "T1", "t1w": "T1", "mprage": "T1", "t2": "T2", "t2w": "T2", "flair": "FLAIR", "t2flair": "FLAIR",
        "t1c": "T1c", "t1ce": "T1c", "t1gd": "T1c", "t1post": "T1c", "t1wce": "T1c"})
    age_unit: Literal["years", "months", "days"] = "years"
    na_values: tuple[str, ...] = DEFAULT_NA
    unknown_columns: Literal["keep", "refuse"] = "keep"
    #: CSV manifests: the column holding the image path (relative paths are relative to the CSV)
    path_column: str = "path"
    #: CSV manifests without a modality column: the modality of every row
    default_modality: str = "T1"


def load_mapping(path: str | Path | None) -> ColumnMapping:
    if path is None:
        return ColumnMapping()
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text()) or {}
        return ColumnMapping.model_validate(data)
    except Exception as e:
        raise ValueError(f"{p}: invalid column mapping: {e}") from None


def _norm(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


@dataclass
class MappingReport:
    """What was mapped: column -> field, value conversions, columns kept in extra."""

    columns: dict[str, str] = field(default_factory=dict)
    extra_columns: set[str] = field(default_factory=set)
    conversions: Counter = field(default_factory=Counter)
    tables: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"tables": self.tables, "columns": dict(sorted(self.columns.items())),
                "kept_in_extra": sorted(self.extra_columns),
                "value_conversions": {k: v for k, v in sorted(self.conversions.items())}}


class TableError(ValueError):
    """A table (or a row of it) that cannot be mapped; names the file, row, column and value."""


def read_table(path: str | Path) -> list[dict[str, str]]:
    """Rows of a TSV (``.tsv``) or CSV as dicts of strings."""
    p = Path(path)
    delim = "\t" if p.suffix.lower() == ".tsv" else ","
    try:
        with open(p, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter=delim)
            if reader.fieldnames is None:
                raise TableError(f"{p}: empty table (no header)")
            rows = []
            for n, row in enumerate(reader, 2):
                if None in row:
                    raise TableError(f"{p}:{n}: more values than header columns")
                rows.append({k.strip(): (v or "").strip() for k, v in row.items()})
            return rows
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise TableError(f"{p}: cannot read table: {e}") from None


class Mapper:
    """Maps rows of tables onto SampleMeta field values for one cohort config."""

    def __init__(self, cfg: ColumnMapping, report: MappingReport | None = None) -> None:
        self.cfg = cfg
        self.report = report or MappingReport()
        self._na = {v.lower() for v in cfg.na_values}
        bad = {c: f for c, f in cfg.columns.items() if f not in META_FIELDS and f != "ignore"}
        if bad:
            raise ValueError(f"column mapping names unknown fields {bad}; known fields: {list(META_FIELDS)}")

    def field_for(self, column: str) -> str | None:
        """SampleMeta field of a source column (config first, then aliases), 'ignore', or None."""
        if column in self.cfg.columns:
            return self.cfg.columns[column]
        n = _norm(column)
        for c, f in self.cfg.columns.items():
            if _norm(c) == n:
                return f
        mapped_by_config = set(self.cfg.columns.values())
        for f, names in ALIASES.items():
            if n in names and f not in mapped_by_config:
                return f
        if n in {_norm(f) for f in META_FIELDS}:
            return next(f for f in META_FIELDS if _norm(f) == n)
        return None

    def _is_na(self, v: Any) -> bool:
        return v is None or (isinstance(v, float) and math.isnan(v)) or str(v).strip().lower() in self._na

    def convert(self, fieldname: str, value: str, where: str) -> Any:
        """One value -> the field's type/code. Raises TableError naming where, the column and value."""
        v = value.strip()
        low = v.lower()

        def code(table: dict[str, str], what: str) -> str:
            if low in table:
                if table[low] != v:
                    self.report.conversions[f"{fieldname}: {v} -> {table[low]}"] += 1
                return table[low]
            raise TableError(f"{where}: {fieldname} value {v!r} is not a known {what} code {sorted(table)}; "
                             f"add it to the column mapping's {fieldname}_values")

        try:
            if fieldname == "sex":
                return code(self.cfg.sex_values, "sex")
            if fieldname == "handedness":
                if low in self.cfg.handedness_values:
                    return code(self.cfg.handedness_values, "handedness")
                try:
                    q = float(v)
                except ValueError:
                    return code(self.cfg.handedness_values, "handedness")
                out = "R" if q >= self.cfg.laterality_cutoff else "L" if q <= -self.cfg.laterality_cutoff else "A"
                self.report.conversions[f"handedness: laterality quotient -> {out}"] += 1
                return out
            if fieldname == "diagnosis":
                if low in self.cfg.diagnosis_values:
                    return code(self.cfg.diagnosis_values, "diagnosis")
                return v
            if fieldname == "modality":
                low = "".join(ch for ch in low if ch.isalnum())
                return code(self.cfg.modality_values, "modality")
            if fieldname == "idh1":
                return code(self.cfg.idh1_values, "IDH1")
            if fieldname == "mgmt":
                return code(self.cfg.mgmt_values, "MGMT")
            if fieldname == "age":
                a = float(v)
                if self.cfg.age_unit == "months":
                    a /= 12.0
                elif self.cfg.age_unit == "days":
                    a /= 365.25
                return a
            if fieldname == "apoe_e4_carrier":
                if low in ("1", "true", "yes", "y", "carrier", "positive"):
                    return True
                if low in ("0", "false", "no", "n", "non-carrier", "noncarrier", "negative"):
                    return False
                raise ValueError("not a yes/no value")
            if fieldname == "tumour_grade":
                g = low.replace("grade", "").replace("who", "").strip()
                roman = {"i": 1, "ii": 2, "iii": 3, "iv": 4}
                return roman[g] if g in roman else int(float(g))
            if fieldname in ("field_strength", "cdr", "mmse", "moca", "education", "gds", "updrs3", "scopa_aut"):
                x = low.rstrip("t").strip() if fieldname == "field_strength" else low
                return float(x)
            if fieldname in ("subject", "session"):
                return v
        except TableError:
            raise
        except (ValueError, KeyError) as e:
            raise TableError(f"{where}: column for {fieldname!r}: value {v!r} cannot be read ({e})") from None
        return v

    def map_row(self, row: dict[str, str], where: str, skip: tuple[str, ...] = ()) -> tuple[dict[str, Any], dict[str, Any]]:
        """Row -> (field values, extra). ``skip`` lists columns handled elsewhere (e.g. the path)."""
        values: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for col, raw in row.items():
            if col in skip:
                continue
            f = self.field_for(col)
            if f == "ignore":
                continue
            if f is None:
                if self.cfg.unknown_columns == "refuse":
                    raise TableError(f"{where}: unknown column {col!r} (unknown_columns: refuse); map it in the "
                                     f"column mapping's `columns` (to a field or 'ignore') or set unknown_columns: keep")
                self.report.extra_columns.add(col)
                if not self._is_na(raw):
                    extra[col] = _scalar(raw)
                continue
            self.report.columns.setdefault(col, f)
            if self._is_na(raw):
                continue
            values[f] = self.convert(f, raw, where)
        return values, extra


def _scalar(v: str) -> str | int | float:
    """Keep numbers as numbers in ``extra`` (no silent loss of type)."""
    try:
        i = int(v)
        return i
    except ValueError:
        pass
    try:
        x = float(v)
        return x if math.isfinite(x) else v
    except ValueError:
        return v
