"""Validated configuration: the task panel (YAML) and the CV protocol (sizes and seeds).

Everything that could be a number in code is a field here, so a site can change the protocol
without editing code and a results folder can record exactly what produced it.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

#: Slice names understood by the runner. "pooled" = mean over one session's modalities.
MODALITIES: tuple[str, ...] = ("T1", "T2", "FLAIR", "T1c")
SLICES: tuple[str, ...] = ("all", *MODALITIES, "pooled")


class PanelError(ValueError):
    """A panel or protocol file is invalid; the message names the file and the reason."""


class QualifyRule(BaseModel):
    """One condition a sample must meet to take part in a task (all rules of a task must hold).

    ``in``/``not_in`` compare the raw metadata value; ``min``/``max`` bound numeric values. A
    missing value (None) never qualifies unless the rule only has ``not_in``.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    field: str
    in_: list[Any] | None = Field(default=None, alias="in")
    not_in: list[Any] | None = None
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _has_condition(self) -> "QualifyRule":
        if self.in_ is None and self.not_in is None and self.min is None and self.max is None:
            raise ValueError(f"qualify rule on {self.field!r} needs one of in, not_in, min, max")
        return self


class TaskSpec(BaseModel):
    """One probe task of the panel.

    ``target`` is a metadata field (dotted paths such as ``extra.my_score`` reach unknown
    columns). For classification, ``classes`` maps raw values to class labels; when given,
    values it does not list are treated as unlabelled. ``max_classes`` keeps the most frequent
    classes (by subjects), e.g. the paper's 19 sites.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9_]+$")
    title: str | None = None
    target: str
    kind: Literal["classification", "regression"]
    classes: dict[Any, str] | None = None
    max_classes: int | None = Field(default=None, ge=2)
    qualify: list[QualifyRule] = Field(default_factory=list)
    slices: list[str] = Field(default_factory=lambda: list(SLICES))
    metrics: list[str] | None = None

    @field_validator("slices")
    @classmethod
    def _known_slices(cls, v: list[str]) -> list[str]:
        bad = [s for s in v if s not in SLICES]
        if bad:
            raise ValueError(f"unknown slice(s) {bad}; known: {list(SLICES)}")
        if not v:
            raise ValueError("a task needs at least one slice")
        return v

    @model_validator(mode="after")
    def _kind_fields(self) -> "TaskSpec":
        if self.kind == "regression" and (self.classes is not None or self.max_classes is not None):
            raise ValueError(f"task {self.name!r}: classes/max_classes only apply to classification")
        allowed = CLASSIFICATION_METRICS if self.kind == "classification" else REGRESSION_METRICS
        if self.metrics is not None:
            bad = [m for m in self.metrics if m not in allowed]
            if bad:
                raise ValueError(f"task {self.name!r}: metric(s) {bad} not in {list(allowed)}")
        return self

    def metric_names(self) -> list[str]:
        """Metrics to report; defaults depend on the task kind."""
        if self.metrics:
            return list(self.metrics)
        return ["auc", "balanced_accuracy"] if self.kind == "classification" else ["mae", "r2"]


CLASSIFICATION_METRICS: tuple[str, ...] = ("auc", "balanced_accuracy", "accuracy")
REGRESSION_METRICS: tuple[str, ...] = ("mae", "r2", "pearson_r")


class HeadlineRow(BaseModel):
    """A row of the head-to-head comparison table (docs/method.md Table 1)."""

    model_config = ConfigDict(extra="forbid")
    task: str
    slice: str
    metric: str


class Panel(BaseModel):
    """A named list of tasks plus the rows that make the headline comparison table."""

    model_config = ConfigDict(extra="forbid")
    name: str
    version: int = 1
    tasks: list[TaskSpec]
    headline: list[HeadlineRow] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> "Panel":
        names = [t.name for t in self.tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate task names {dup}")
        known = set(names)
        for row in self.headline:
            if row.task not in known:
                raise ValueError(f"headline row names unknown task {row.task!r}")
        return self

    def task(self, name: str) -> TaskSpec:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(f"no task {name!r} in panel {self.name!r}; tasks: {[t.name for t in self.tasks]}")

    def subset(self, names: list[str] | None) -> "Panel":
        """The panel restricted to ``names`` (in panel order); None keeps everything."""
        if not names:
            return self
        for n in names:
            self.task(n)
        keep = set(names)
        return self.model_copy(
            update={"tasks": [t for t in self.tasks if t.name in keep], "headline": [h for h in self.headline if h.task in keep]}
        )


class ProtocolConfig(BaseModel):
    """Cross-validation and model settings (docs/method.md §4). Presets: ``paper`` and ``tiny``."""

    model_config = ConfigDict(extra="forbid")

    n_splits: int = Field(default=5, ge=2)
    seed: int = 2025
    min_class_subjects: int = Field(default=5, ge=1)
    min_task_subjects: int = Field(default=20, ge=2)
    regression_strata: int = Field(default=5, ge=1, description="quantile bins used to stratify regression targets")
    logreg_C: float = Field(default=1.0, gt=0)
    logreg_max_iter: int = Field(default=1000, ge=1)
    logreg_tol: float = Field(default=1e-4, gt=0)
    ridge_alphas: list[float] = Field(default_factory=lambda: [10.0**e for e in range(-2, 6)])
    ridge_inner_cv: Literal["folds", "gcv"] | int = Field(
        default="folds",
        description="how the ridge penalty is chosen: 'folds' = subject-grouped inner CV over the outer CV's other folds "
                    "(n_splits folds outside the panel); an int k = subject-grouped inner k-fold; 'gcv' = generalised "
                    "cross-validation in closed form, which treats a subject's repeated visits as independent rows",
    )
    threads: int = Field(default=1, ge=1, description="BLAS threads per fit (1 avoids oversubscription)")
    n_jobs: int = Field(default=2, ge=1, description="fold fits run in parallel (threads); shuffled cross-validations of the permutation test (processes)")
    warm_start: bool = Field(
        default=False, description="start logistic fits from the first fold's solution (measured: no fewer iterations)"
    )
    dtype: Literal["float32", "float64"] = Field(
        default="float32",
        description="precision of standardised features and probe parameters (shards store float32; ~1.4x faster fits)",
    )
    pca: int | None = Field(
        default=None, ge=1,
        description="reduce the standardised features to this many principal components, fitted on each training part "
                    "only (a baseline on wide raw features, e.g. voxels, at an encoder's width); probes stay linear in the "
                    "original features")
    save_probes: bool = True
    save_fold_probes: bool = False
    pooled_min_modalities: int = Field(default=1, ge=1)
    permutations: int = Field(
        default=0, ge=0,
        description="cross-validate the selected slices this many more times on shuffled labels for a p-value (0: no test)")
    permute: list[str] = Field(
        default_factory=lambda: ["headline"], min_length=1,
        description="slices the permutation test covers: 'headline' (the panel's headline rows) and/or TASK/SLICE "
                    "patterns with * and ? (e.g. 'disease/all', '*/T1', '*/*')")

    @field_validator("ridge_inner_cv")
    @classmethod
    def _inner(cls, v: Any) -> Any:
        if isinstance(v, int) and v < 2:
            raise ValueError("ridge_inner_cv as an int must be >= 2")
        return v

    def digest(self) -> str:
        """Short content hash, recorded beside results so runs can be told apart.

        The permutation test's settings are left out: they add p-values but change no split,
        probe or score, so two runs that differ only in them hold comparable results."""
        blob = json.dumps(self.model_dump(exclude={"permutations", "permute"}), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


PROTOCOL_PRESETS: dict[str, dict[str, Any]] = {
    # docs/method.md §4: 5-fold, seed 2025, logistic regression max_iter 1000, ridge.
    "paper": {},
    # For unit tests and demos on a handful of subjects.
    "tiny": {"n_splits": 3, "min_class_subjects": 3, "min_task_subjects": 9, "ridge_alphas": [0.1, 1.0, 10.0, 100.0]},
}


def protocol_preset(name: str = "paper", **overrides: Any) -> ProtocolConfig:
    """A protocol from a named preset with optional field overrides."""
    if name not in PROTOCOL_PRESETS:
        raise PanelError(f"unknown protocol preset {name!r}; known: {sorted(PROTOCOL_PRESETS)}")
    return ProtocolConfig(**{**PROTOCOL_PRESETS[name], **overrides})


def load_protocol(path: str | Path | None = None, preset: str = "paper", **overrides: Any) -> ProtocolConfig:
    """Protocol from a YAML/JSON file (fields over the preset), or the preset alone."""
    if path is None:
        return protocol_preset(preset, **overrides)
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise PanelError(f"{p}: cannot read protocol file: {e}") from e
    if not isinstance(data, dict):
        raise PanelError(f"{p}: protocol file must be a mapping, got {type(data).__name__}")
    try:
        return protocol_preset(preset, **{**data, **overrides})
    except ValidationError as e:
        raise PanelError(f"{p}: invalid protocol: {e}") from e


def _panel_from_data(data: Any, source: str) -> Panel:
    if not isinstance(data, dict):
        raise PanelError(f"{source}: panel file must be a mapping with 'name' and 'tasks'")
    try:
        return Panel.model_validate(data)
    except ValidationError as e:
        raise PanelError(f"{source}: invalid panel: {e}") from e


def load_panel(path: str | Path | None = None) -> Panel:
    """Load a panel YAML; None = the default 23-task panel shipped inside the package."""
    if path is None:
        text = resources.files("g3n_probe").joinpath("panels/default.yaml").read_text()
        source = "g3n_probe/panels/default.yaml"
    else:
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as e:
            raise PanelError(f"{p}: cannot read panel file: {e}") from e
        source = str(p)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise PanelError(f"{source}: not valid YAML: {e}") from e
    return _panel_from_data(data, source)
