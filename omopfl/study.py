"""The study specification (``study.toml``): identical at every site; the server sends it.

It names the target and outcome cohorts and the time at risk, the features (computed in the
database), the fixed categorical levels, the linked modalities, validation thresholds, the model
and training settings.  A site checks it against what it can serve and refuses, with a clear
error, what it cannot.

Example: ``examples/t2dm_hf/study.toml``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omopfl.covariate_sets import CovariateSettings, parse_covariates
from omopfl.errors import ConfigError
from omopfl.models import BATCHNORM_KINDS, IMAGE_KINDS, MODEL_KINDS, min_image_size

__all__ = [
    "StudyConfig",
    "ConceptSetFeature",
    "MeasurementFeature",
    "CategoricalFeature",
    "ImagingSpec",
    "OmicsSpec",
    "ValidationSpec",
    "ModelSpec",
    "TrainingSpec",
    "PrivacySpec",
    "SplitSpec",
    "load_study",
    "DEMOGRAPHICS",
    "DOMAIN_TABLES",
    "TRAINING_SECTIONS",
]

NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
LEVEL_RE = re.compile(r"^[a-z][a-z0-9_]{0,30}$")
MAX_DAYS = 100_000  # about 270 years: a window or time at risk beyond this is a typo
MAX_CONCEPT_ID = 2**31 - 1  # OMOP concept_id is a 32-bit integer
RESERVED_NAMES = ("person_id", "index_date", "label")  # key columns of every feature frame
GENERATED_SEPARATOR = "__"  # <measurement>__missing, __unknown_unit, __non_finite are generated
DEMOGRAPHICS = ("age", "sex", "prior_observation_days")
# domain -> (table, concept column, start date column)
DOMAIN_TABLES: dict[str, tuple[str, str, str]] = {
    "condition_occurrence": ("condition_occurrence", "condition_concept_id", "condition_start_date"),
    "drug_exposure": ("drug_exposure", "drug_concept_id", "drug_exposure_start_date"),
    "procedure_occurrence": ("procedure_occurrence", "procedure_concept_id", "procedure_date"),
    "observation": ("observation", "observation_concept_id", "observation_date"),
    "visit_occurrence": ("visit_occurrence", "visit_concept_id", "visit_start_date"),
    "visit": ("visit_occurrence", "visit_concept_id", "visit_start_date"),
    "measurement": ("measurement", "measurement_concept_id", "measurement_date"),
    "condition_era": ("condition_era", "condition_concept_id", "condition_era_start_date"),
    "drug_era": ("drug_era", "drug_concept_id", "drug_era_start_date"),
}
# domain of a value or categorical feature -> (table, concept column, date, datetime, row id)
VALUE_TABLES: dict[str, tuple[str, str, str, str, str]] = {
    "measurement": ("measurement", "measurement_concept_id", "measurement_date", "measurement_datetime",
                    "measurement_id"),
    "observation": ("observation", "observation_concept_id", "observation_date", "observation_datetime",
                    "observation_id"),
}
VALUE_AGGREGATES = ("last", "mean", "min", "max", "count")
UNITLESS = "1"  # the UCUM code of a declared unitless (dimensionless) value
OTHER_LEVEL = "other"  # the one-hot level of a categorical value in none of the study's levels
MODELS = MODEL_KINDS
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fednova", "scaffold")
ADAPTIVE_STRATEGIES = ("fedadam", "fedyogi", "fedadagrad")  # server-side optimizers (Reddi et al. 2021)
SITE_STRATEGIES = ("fednova", "scaffold")  # strategies that change what a site computes and releases
OPTIMIZERS = ("adam", "sgd")
TRAINING_SECTIONS = ("study", "model", "training", "privacy")
"""Sections that do not define the prepared dataset (:attr:`StudyConfig.dataset_hash` leaves them out):
the study's name and description, the model, the training settings (incl. the random split's
``test_fraction``/``seed``, drawn at training time) and differential privacy (applied when releasing)."""


@dataclass(frozen=True)
class ConceptSetFeature:
    """Presence (0/1) or count of events of a concept set in a window before index."""

    name: str
    domain: str
    concepts: tuple[int, ...]
    descendants: bool = True
    window: tuple[int, int] = (-365, 0)
    aggregate: str = "presence"  # presence | count


@dataclass(frozen=True)
class MeasurementFeature:
    """A measurement value in a window before index, converted to one canonical unit."""

    name: str
    concepts: tuple[int, ...]
    unit: str  # canonical unit, UCUM code, e.g. "mg/dL"
    analyte: str | None = None  # for molar conversions: glucose, creatinine, hba1c, cholesterol
    window: tuple[int, int] = (-365, 0)
    aggregate: str = "last"  # last | mean | min | max | count (of usable rows; never missing)
    plausible_range: tuple[float, float] | None = None
    descendants: bool = False
    domain: str = "measurement"  # measurement | observation (value_as_number)

    @property
    def unitless(self) -> bool:
        """Declared unitless (``unit = "1"``): rows without a unit or with a dimensionless one are used."""
        return self.unit == UNITLESS

    @property
    def can_be_missing(self) -> bool:
        """A value aggregate is missing when no usable row is in the window; a count is 0 then."""
        return self.aggregate != "count"


@dataclass(frozen=True)
class CategoricalFeature:
    """The last ``value_as_concept_id`` of a concept set in a window, mapped onto levels fixed by the study.

    One-hot columns ``<name>_<label>`` per level and ``<name>_other`` for a value in no level; a person
    with no value in the window has all zeros (which is its own, explicit, encoding: no missing indicator).
    """

    name: str
    domain: str
    concepts: tuple[int, ...]
    levels: tuple[tuple[str, tuple[int, ...]], ...]
    window: tuple[int, int] = (-365, 0)
    descendants: bool = False

    @property
    def labels(self) -> tuple[str, ...]:
        """One-hot levels in column order, ``other`` last."""
        return (*(label for label, _ in self.levels), OTHER_LEVEL)

    def columns(self) -> list[str]:
        return [f"{self.name}_{label}" for label in self.labels]


@dataclass(frozen=True)
class ImagingSpec:
    enabled: bool = False
    modalities: tuple[str, ...] = ("MR", "CT")
    size: int = 32
    window: tuple[int, int] = (-365, 0)


@dataclass(frozen=True)
class OmicsSpec:
    enabled: bool = False
    genes: tuple[str, ...] = ()
    log1p: bool = True


@dataclass(frozen=True)
class ValidationSpec:
    min_completeness: float = 0.5  # a measurement feature observed in fewer persons is a warning
    fatal_completeness: float = 0.0  # below this it is fatal
    min_persons: int = 10
    allow_fatal: bool = False  # a site may override fatal failures explicitly (its own TOML or CLI)


@dataclass(frozen=True)
class ModelSpec:
    kind: str = "logistic"
    hidden: tuple[int, ...] = (256, 512, 128, 64, 32)
    dropout: tuple[float, float] = (0.4, 0.15)
    l2: float = 0.0  # L2 penalty (weight decay) on the weights; used by covariate studies

    @classmethod
    def from_settings(cls, kind: str, hidden: str, dropout: str) -> ModelSpec:
        """The model a message's or run config's settings describe (``model-kind``, and ``model-hidden`` /
        ``model-dropout`` as JSON lists): the one decoder the coordinator, the site's training and its
        validation use.  An empty ``hidden`` list means the default widths."""
        widths = tuple(int(h) for h in json.loads(hidden))
        return cls(kind=str(kind), hidden=widths or cls().hidden, dropout=tuple(float(d) for d in json.loads(dropout)))


@dataclass(frozen=True)
class TrainingSpec:
    rounds: int = 5
    local_epochs: int = 1
    batch_size: int = 64
    learning_rate: float = 0.01
    strategy: str = "fedavg"
    proximal_mu: float = 0.0
    min_sites: int = 2
    test_fraction: float = 0.25
    seed: int = 0
    threshold: float = 0.5  # operating threshold of the released accuracy/F1/kappa (and the release rule's cells)
    # issue 14b: strategy settings.  Server optimizer (fedadam/fedyogi/fedadagrad; ``eta`` also scaffold's
    # global step): None means Flower's default for that strategy.
    eta: float | None = None
    eta_l: float | None = None
    beta_1: float | None = None
    beta_2: float | None = None
    tau: float | None = None
    # the local optimizer at every site (and in pooled training)
    optimizer: str = "adam"
    momentum: float = 0.0
    weight_decay: float = 0.0
    local_steps: int = 0  # > 0: that many minibatch steps per round instead of local_epochs

    def server_options(self) -> dict[str, float]:
        """The server optimizer settings the study states (keyword arguments of Flower's strategy)."""
        names = ("eta", "eta_l", "beta_1", "beta_2", "tau")
        return {name: float(getattr(self, name)) for name in names if getattr(self, name) is not None}


@dataclass(frozen=True)
class PrivacySpec:
    """Differential privacy the study states (``[privacy]``); a site's policy may require it.

    ``statistics_epsilon``: Gaussian noise on every statistics release at this epsilon (with ``delta``)
    and the public clipping ``bounds`` per feature.  ``dp_sgd``: training updates by DP-SGD (Opacus)
    calibrated so the whole study spends ``target_epsilon`` at each site.  ``budget_epsilon``: the most a
    site spends on this study in all (statistics and training); it refuses to release beyond it.
    """

    statistics_epsilon: float | None = None
    delta: float = 1e-6
    bounds: tuple[tuple[str, float, float], ...] = ()
    dp_sgd: bool = False
    target_epsilon: float | None = None
    max_grad_norm: float = 1.0
    budget_epsilon: float | None = None
    secure_aggregation: bool = False
    participants: tuple[tuple[str, str], ...] = ()
    metrics_epsilon: float | None = None  # DP on released evaluation metrics (omopfl.dp_metrics)

    @property
    def enabled(self) -> bool:
        return self.statistics_epsilon is not None or self.dp_sgd or self.metrics_epsilon is not None


@dataclass(frozen=True)
class SplitSpec:
    """How the test set is chosen (``[split]``, :mod:`omopfl.splits`).

    ``random`` (default, no ``[split]``): ``[training] test_fraction``/``seed`` at training time.
    ``hash``: a person is in the test set iff a keyed hash of (``seed``, person_id) is below
    ``test_fraction``.  ``cohort``: the target persons who are in the study's test cohort
    (``[split] test_cohort``; its file and id are :meth:`StudyConfig.cohort_file`/``cohort_ids`` under
    role ``test``).
    """

    method: str = "random"
    test_fraction: float = 0.0
    seed: int = 0
    test_cohort: Path | None = None

    @property
    def fixed(self) -> bool:
        """The study fixes the test set (it is part of the prepared dataset)."""
        return self.method != "random"


@dataclass(frozen=True)
class StudyConfig:
    """A parsed ``study.toml``."""

    name: str
    description: str
    target_cohort: Path | None
    outcome_cohort: Path | None
    time_at_risk: tuple[int, int]
    demographics: tuple[str, ...]
    concept_sets: tuple[ConceptSetFeature, ...]
    measurements: tuple[MeasurementFeature, ...]
    categories: dict[str, tuple[str, ...]]
    imaging: ImagingSpec
    omics: OmicsSpec
    validation: ValidationSpec
    model: ModelSpec
    training: TrainingSpec
    source: Path | None = field(default=None, compare=False)
    privacy: PrivacySpec = field(default_factory=PrivacySpec)
    text: str = field(default="", compare=False, repr=False)
    covariates: CovariateSettings | None = None  # [covariates] (issue 13b): FeatureExtraction covariate sets
    cohort_ids: dict[str, int] = field(default_factory=dict)
    """Cohort ids the study fixes, by role (``target``/``outcome``): the id a definition file is built
    under (overriding the file's own), or, where the role's file is None, a cohort already built at
    the site under that id (``omopfl cohort build --id``)."""

    def cohort_file(self, role: str) -> Path | None:
        """The definition file of ``role`` (None: a cohort already built at the site)."""
        if role == "test":
            return self.split.test_cohort
        return self.target_cohort if role == "target" else self.outcome_cohort

    categoricals: tuple[CategoricalFeature, ...] = ()
    split: SplitSpec = field(default_factory=SplitSpec)

    def cohort_roles(self) -> tuple[str, ...]:
        """The cohort roles the study needs at a site: target, outcome, and test for a cohort split."""
        return ("target", "outcome", "test") if self.split.method == "cohort" else ("target", "outcome")

    def tables_read(self) -> dict[str, str]:
        """CDM tables the study's features read: ``{table: the study key that reads it}``."""
        needed: dict[str, str] = {}
        for f in self.concept_sets:
            needed.setdefault(DOMAIN_TABLES[f.domain][0], f"[[features.concept_sets]] {f.name}")
        for m in self.measurements:
            needed.setdefault(VALUE_TABLES[m.domain][0], f"[[features.measurements]] {m.name}")
        for c in self.categoricals:
            needed.setdefault(VALUE_TABLES[c.domain][0], f"[[features.categoricals]] {c.name}")
        if self.imaging.enabled:
            needed.setdefault("image_occurrence", "[linking.images] enabled")
        if self.omics.enabled:
            needed.setdefault("specimen", "[linking.omics] enabled")
        return needed

    @property
    def hash(self) -> str:
        """sha256 of the study file's text (the same file at every site gives the same hash).

        With a ``[covariates] list`` file, the hash also covers that file's bytes, so the fixed
        covariate list is part of what a site approves.
        """
        if self.covariates is not None and self.covariates.list_sha256:
            return hashlib.sha256(self.text.encode() + b"\0covariates:" + self.covariates.list_sha256.encode()
                                  ).hexdigest()
        return hashlib.sha256(self.text.encode()).hexdigest()

    @property
    def dataset_hash(self) -> str:
        """sha256 of what defines the prepared dataset: the study's sections except :data:`TRAINING_SECTIONS`
        (parsed, so comments and key order do not count), the bytes of every cohort definition file it
        references, and a ``[covariates] list`` file's hash.

        A site accepts training of an approved study when its prepared dataset carries the approved
        study's dataset hash: a change of the learning rate or the rounds needs a new approval (the
        study hash, :attr:`hash`, changes) but no re-preparation.
        """
        import json

        data = tomllib.loads(self.text) if self.text else {}
        defining = {key: value for key, value in data.items() if key not in TRAINING_SECTIONS}
        files = {}
        for role in self.cohort_roles():
            file = self.cohort_file(role)
            files[role] = hashlib.sha256(file.read_bytes()).hexdigest() if file is not None and file.is_file() else None
        payload = {"study": defining, "cohort_files": files,
                   "covariates_list": self.covariates.list_sha256 if self.covariates is not None else None}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()

    def feature_names(self) -> list[str]:
        """Tabular feature columns in order (before harmonization adds missingness indicators)."""
        names: list[str] = []
        for demographic in self.demographics:
            if demographic == "sex":
                names += [f"sex_{level}" for level in self.categories["sex"]]
            else:
                names.append(demographic)
        names += [f.name for f in self.concept_sets]
        names += [m.name for m in self.measurements]
        for c in self.categoricals:
            names += c.columns()
        return names


class _Reader:
    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.path}: {key} {problem}")

    def table(self, data: dict, key: str, required: bool = False) -> dict:
        value = data.get(key.split(".")[-1])
        if value is None:
            if required:
                raise self.fail(f"[{key}]", "is missing")
            return {}
        if not isinstance(value, dict):
            raise self.fail(f"[{key}]", "must be a table")
        return value

    def keys(self, data: dict, key: str, allowed: set[str]) -> None:
        unknown = sorted(set(data) - allowed)
        if unknown:
            expected = ", ".join(sorted(allowed))
            raise self.fail(f"[{key}] {unknown[0]}", f"is not a known key; expected one of {expected}")

    def get(self, data: dict, section: str, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        if key not in data:
            if default is ...:
                raise self.fail(f"[{section}] {key}", "is missing")
            return default
        value = data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            raise self.fail(f"[{section}] {key}", f"must be {' or '.join(k.__name__ for k in kinds)}")
        if not isinstance(value, kinds):
            raise self.fail(f"[{section}] {key}", f"must be {' or '.join(k.__name__ for k in kinds)}")
        if isinstance(value, str) and "\x00" in value:
            raise self.fail(f"[{section}] {key}", "must not hold NUL characters")
        return value

    def integer(self, data: dict, section: str, key: str, default: int, low: int, high: int) -> int:
        value = self.get(data, section, key, int, default)
        if not low <= value <= high:
            raise self.fail(f"[{section}] {key}", f"must be between {low} and {high:,}")
        return value

    def number(self, data: dict, section: str, key: str, default: float, low: float, high: float, *,
               low_open: bool = False, high_open: bool = False) -> float:
        """A finite number in [low, high] (``low_open``/``high_open``: that bound excluded)."""
        try:
            value = float(self.get(data, section, key, (int, float), default))
        except OverflowError:  # an integer beyond any float
            value = math.inf
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (math.isfinite(value) and above and below):
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise self.fail(f"[{section}] {key}", f"must be a finite number in {interval}")
        return value

    def name(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or not NAME_RE.match(value):
            raise self.fail(where, "must be a lower-case name (letters, digits, underscores; starting with a letter)")
        return value

    def window(self, data: dict, section: str, default: tuple[int, int], key: str = "window",
               what: str = "relative to index") -> tuple[int, int]:
        value = data.get(key, list(default))
        if (not isinstance(value, list) or len(value) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and abs(v) <= MAX_DAYS for v in value)
                or value[0] > value[1]):
            raise self.fail(f"[{section}] {key}", f"must be [start, end] in days {what}, start <= end, "
                            f"each within ±{MAX_DAYS:,}")
        return value[0], value[1]

    def concepts(self, data: dict, section: str, key: str = "concepts") -> tuple[int, ...]:
        value = data.get(key)
        if (not isinstance(value, list) or not value
                or not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_CONCEPT_ID
                           for v in value)):
            raise self.fail(f"[{section}] {key}", "must be a non-empty list of OMOP concept ids "
                            f"(integers from 1 to {MAX_CONCEPT_ID})")
        return tuple(value)

    def strings(self, data: dict, section: str, key: str, default: list[str], *, pattern: re.Pattern | None = None,
                what: str = "strings") -> tuple[str, ...]:
        value = self.get(data, section, key, list, default)
        if not all(isinstance(v, str) and v and "\x00" not in v and (pattern is None or pattern.match(v))
                   for v in value):
            raise self.fail(f"[{section}] {key}", f"must be a list of {what}")
        if len(set(value)) != len(value):
            raise self.fail(f"[{section}] {key}", "lists a value twice")
        return tuple(value)


MODALITY_RE = re.compile(r"^[A-Z0-9]{1,16}$")
UNIT_RE = re.compile(r"^[A-Za-z0-9%/\[\]{}_.*^+\-]{1,64}$")  # UCUM codes (the alphabet omopfl.features inlines)


def _check_unit(r: _Reader, section: str, unit: str, analyte: str | None) -> None:
    """The canonical unit must be one omopfl converts into, and the analyte one it knows."""
    from omopfl.harmonize import canonical_analyte, conversions_to

    if analyte is not None and canonical_analyte(analyte) is None:
        raise r.fail(f"[{section}] analyte", "is not an analyte omopfl converts (e.g. glucose, creatinine, hba1c, "
                     "cholesterol, triglycerides); leave it out for unit-only conversions")
    if not UNIT_RE.match(unit):
        raise r.fail(f"[{section}] unit", "must be a UCUM unit code (e.g. mg/dL)")
    try:
        conversions_to(analyte, unit)
    except (KeyError, ValueError):
        raise r.fail(f"[{section}] unit", "has no conversion table; use a UCUM code omopfl knows") from None


def _check_generated_names(r: _Reader, names: list[str], demographics: list[str],
                           categories: dict[str, tuple[str, ...]], measurements: list,
                           categoricals: list | tuple = ()) -> None:
    """Refuse feature names that collide with the frame's keys or the columns harmonization generates."""
    from omopfl.harmonize import MISSING_SUFFIX, NON_FINITE_SUFFIX, UNKNOWN_UNIT_SUFFIX

    own = set(names)
    generated: dict[str, str] = {}
    if "sex" in demographics:
        generated.update({f"sex_{level}": "a sex level column" for level in categories["sex"]})
    for m in measurements:
        for suffix in (MISSING_SUFFIX, UNKNOWN_UNIT_SUFFIX, NON_FINITE_SUFFIX):
            generated[m.name + suffix] = f"a column generated for measurement {m.name}"
    for c in categoricals:
        for column in c.columns():
            if column in generated:
                raise r.fail("[features]", f"categorical {c.name}: column {column!r} collides with "
                             f"{generated[column]}; "
                             "rename the feature or the level")
            generated[column] = f"a level column of categorical {c.name}"
    for name in names:
        if name in RESERVED_NAMES:
            raise r.fail("[features]", f"name {name!r} is reserved (a key column of every dataset); rename it")
        if name in generated and name not in DEMOGRAPHICS:
            raise r.fail("[features]", f"name {name!r} collides with {generated[name]}; rename it")
        if GENERATED_SEPARATOR in name and name not in DEMOGRAPHICS:
            raise r.fail("[features]", f"name {name!r} contains '{GENERATED_SEPARATOR}', which is reserved for "
                         "generated columns (e.g. <measurement>__missing); rename it")
    clash = own & set(generated)
    if clash:  # pragma: no cover - caught above, kept as a guard
        raise r.fail("[features]", f"name {sorted(clash)[0]!r} collides with a generated column")


_COHORT_FORMS = ('a definition file ("target.json"), {file = "atlas_export.json", id = 7} '
                 "(an ATLAS export as it is, the study gives its id) or {cohort_id = 7} "
                 "(a cohort already built at each site with omopfl cohort build --id 7)")


def _cohort_reference(r: _Reader, path: Path, cohorts: dict, key: str,
                      section: str = "cohorts") -> tuple[Path | None, int | None]:
    """(definition file or None, the id the study fixes or None) of ``[<section>] key``."""
    where = f"[{section}] {key}"
    if key not in cohorts:
        raise r.fail(where, f"is missing; give {_COHORT_FORMS}")
    value = cohorts[key]
    if isinstance(value, str):
        file = _resolve(path.parent, r.get(cohorts, section, key, str))
        given = None
    elif isinstance(value, dict):
        r.keys(value, f"{section}.{key}", {"file", "id", "cohort_id"})
        if "cohort_id" in value and ("file" in value or "id" in value):
            raise r.fail(where, "takes either cohort_id (built at the site) or file and id, not both")
        if "cohort_id" in value:
            return None, r.integer(value, f"{section}.{key}", "cohort_id", 0, 1, 2**31 - 1)
        if "file" not in value:
            raise r.fail(where, f"needs file = \"...\" or cohort_id; give {_COHORT_FORMS}")
        file = _resolve(path.parent, r.get(value, f"{section}.{key}", "file", str))
        given = r.integer(value, f"{section}.{key}", "id", 0, 1, 2**31 - 1) if "id" in value else None
    else:
        raise r.fail(where, f"must be {_COHORT_FORMS}")
    if not file.is_file():
        raise r.fail(where, "names a cohort definition file that does not exist")
    return file, given


def _resolve(base: Path, value: str) -> Path:
    try:
        path = Path(value).expanduser()
    except RuntimeError:  # ~user of an unknown user
        path = Path(value)
    return path if path.is_absolute() else (base / path).resolve()


def _split(r: _Reader, path: Path, t: dict, cohort_ids: dict[str, int]) -> SplitSpec:
    """``[split]``: the test set the study fixes (:mod:`omopfl.splits`); adds the test cohort's id to ``cohort_ids``."""
    from omopfl.splits import METHODS

    r.keys(t, "split", {"method", "test_fraction", "seed", "test_cohort"})
    if not t:
        return SplitSpec()
    method = r.get(t, "split", "method", str, "cohort" if "test_cohort" in t else "random")
    if method not in METHODS:
        raise r.fail("[split] method", f"must be one of {', '.join(METHODS)}")
    if method == "random":
        if set(t) - {"method"}:
            raise r.fail(f"[split] {sorted(set(t) - {'method'})[0]}", "does not apply to method = \"random\" "
                         "(it takes [training] test_fraction and seed)")
        return SplitSpec()
    if method == "cohort":
        if "test_cohort" not in t:
            raise r.fail("[split] test_cohort", f"is missing (method = \"cohort\"); give {_COHORT_FORMS}")
        extra = sorted(set(t) & {"test_fraction", "seed"})
        if extra:
            raise r.fail(f"[split] {extra[0]}", "does not apply to method = \"cohort\" (the cohort is the test set)")
        file, given = _cohort_reference(r, path, t, "test_cohort", section="split")
        if given is not None:
            if given in (cohort_ids.get("target"), cohort_ids.get("outcome")):
                raise r.fail("[split] test_cohort", "has the target or outcome cohort's id; give it its own id")
            cohort_ids["test"] = given
        return SplitSpec("cohort", test_cohort=file)
    if "test_cohort" in t:
        raise r.fail("[split] test_cohort", "does not apply to method = \"hash\"; use method = \"cohort\"")
    fraction = r.number(t, "split", "test_fraction", 0.25, 0.0, 1.0, low_open=True, high_open=True)
    return SplitSpec("hash", test_fraction=fraction, seed=r.integer(t, "split", "seed", 0, 0, 2**63 - 1))


def _privacy(r: _Reader, t: dict) -> PrivacySpec:
    import math

    r.keys(t, "privacy", {"statistics_epsilon", "delta", "bounds", "dp_sgd", "target_epsilon", "max_grad_norm",
                          "budget_epsilon", "secure_aggregation", "participants", "metrics_epsilon"})

    def positive(key: str, default: float | None) -> float | None:
        value = r.get(t, "privacy", key, (int, float), default)
        if value is None:
            return None
        if not (-1e308 < value < 1e308) or not math.isfinite(float(value)) or float(value) <= 0:
            raise r.fail(f"[privacy] {key}", "must be a positive finite number")
        return float(value)

    delta = positive("delta", 1e-6)
    assert delta is not None
    if not delta < 1:
        raise r.fail("[privacy] delta", "must be below 1")
    bounds_table = r.get(t, "privacy", "bounds", dict, {})
    bounds = []
    for feature, pair in bounds_table.items():
        if (not isinstance(pair, list) or len(pair) != 2 or not all(isinstance(v, int | float) and not
                                                                    isinstance(v, bool) for v in pair)
                or not all(-1e308 < v < 1e308 for v in pair) or not pair[0] < pair[1]):
            raise r.fail(f"[privacy.bounds] {feature}", "must be [low, high] with finite low < high")
        bounds.append((str(feature), float(pair[0]), float(pair[1])))
    statistics_epsilon = positive("statistics_epsilon", None)
    participants = []
    for site_name, key in r.get(t, "privacy", "participants", dict, {}).items():
        if not isinstance(key, str) or len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise r.fail(f"[privacy.participants] {site_name}",
                         "must be the site's Ed25519 identity public key, 64 lower-case hex digits "
                         "(omopfl.federation.site.secure.identity_public_key)")
        participants.append((str(site_name), key))
    dp_sgd = r.get(t, "privacy", "dp_sgd", bool, False)
    target = positive("target_epsilon", None)
    if dp_sgd and target is None:
        raise r.fail("[privacy] target_epsilon", "is required with dp_sgd = true (the whole study's epsilon per site)")
    return PrivacySpec(statistics_epsilon=statistics_epsilon, delta=delta, bounds=tuple(bounds), dp_sgd=dp_sgd,
                       target_epsilon=target, max_grad_norm=positive("max_grad_norm", 1.0) or 1.0,
                       budget_epsilon=positive("budget_epsilon", None),
                       secure_aggregation=r.get(t, "privacy", "secure_aggregation", bool, False),
                       participants=tuple(sorted(participants)), metrics_epsilon=positive("metrics_epsilon", None))


_STRATEGY_KEYS = ("eta", "eta_l", "beta_1", "beta_2", "tau", "optimizer", "momentum", "weight_decay", "local_steps")


def _strategy_settings(r: _Reader, t: dict, training: TrainingSpec) -> TrainingSpec:
    """``[training]``'s strategy settings (issue 14b), checked against the strategy they belong to."""
    from dataclasses import replace

    strategy = training.strategy
    server: dict[str, float | None] = {}
    for key, low, high, low_open in (("eta", 0.0, 1e3, True), ("eta_l", 0.0, 1e3, True),
                                     ("beta_1", 0.0, 1.0, False), ("beta_2", 0.0, 1.0, False),
                                     ("tau", 0.0, 1e3, True)):
        server[key] = r.number(t, "training", key, 0.0, low, high, low_open=low_open,
                               high_open=key.startswith("beta")) if key in t else None
        if key not in t:
            continue
        allowed = ADAPTIVE_STRATEGIES + (("scaffold",) if key == "eta" else ())
        if key.startswith("beta"):
            allowed = ("fedadam", "fedyogi")
        if strategy not in allowed:
            raise r.fail(f"[training] {key}", f"applies to strategy {' or '.join(allowed)}, not {strategy!r}")
    optimizer = r.get(t, "training", "optimizer", str, "adam")
    if optimizer not in OPTIMIZERS:
        raise r.fail("[training] optimizer", f"must be one of {', '.join(OPTIMIZERS)}")
    momentum = r.number(t, "training", "momentum", 0.0, 0.0, 1.0, high_open=True)
    if momentum and optimizer != "sgd":
        raise r.fail("[training] momentum", 'applies to optimizer = "sgd" (Adam has its own moments)')
    if strategy in SITE_STRATEGIES and optimizer != "sgd":
        raise r.fail("[training] optimizer", f'must be "sgd" with strategy = "{strategy}" (its update rule is '
                     "written for local SGD)")
    if strategy == "scaffold" and momentum:
        raise r.fail("[training] momentum", 'must be 0 with strategy = "scaffold" (option II assumes plain SGD)')
    local_steps = r.integer(t, "training", "local_steps", 0, 1, 10**7) if "local_steps" in t else 0
    if local_steps and "local_epochs" in t:
        raise r.fail("[training] local_steps", "and local_epochs exclude each other: set one")
    return replace(training, **server, optimizer=optimizer, momentum=momentum,
                   weight_decay=r.number(t, "training", "weight_decay", 0.0, 0.0, 1e3), local_steps=local_steps)


def load_study(path: str | Path) -> StudyConfig:
    """Parse and check a ``study.toml``; errors name the file and key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: study file not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; save the study as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the study file ({type(exc).__name__})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid TOML (nested too deeply)") from None
    r = _Reader(path)
    r.keys(data, "top level", {"study", "cohorts", "outcome", "features", "categories", "linking", "validation",
                               "model", "training", "privacy", "covariates", "split"})
    study = r.table(data, "study", required=True)
    r.keys(study, "study", {"name", "description"})
    name = r.name(r.get(study, "study", "name", str), "[study] name")
    description = r.get(study, "study", "description", str, "")

    cohorts = r.table(data, "cohorts", required=True)
    r.keys(cohorts, "cohorts", {"target", "outcome"})
    cohort_files: dict[str, Path | None] = {}
    cohort_ids: dict[str, int] = {}
    for key in ("target", "outcome"):
        cohort_files[key], given = _cohort_reference(r, path, cohorts, key)
        if given is not None:
            cohort_ids[key] = given
    if cohort_ids.get("target") is not None and cohort_ids.get("target") == cohort_ids.get("outcome"):
        raise r.fail("[cohorts] outcome", "has the target cohort's id; give each cohort its own id")
    target, outcome = cohort_files["target"], cohort_files["outcome"]

    outcome_section = r.table(data, "outcome")
    r.keys(outcome_section, "outcome", {"time_at_risk"})
    tar = r.window(outcome_section, "outcome", (1, 365), key="time_at_risk", what="after index")

    features = r.table(data, "features")
    r.keys(features, "features", {"demographics", "concept_sets", "measurements", "categoricals"})
    demographics = features.get("demographics", list(DEMOGRAPHICS))
    if not isinstance(demographics, list) or any(not isinstance(d, str) or d not in DEMOGRAPHICS
                                                 for d in demographics):
        raise r.fail("[features] demographics", f"must list some of {', '.join(DEMOGRAPHICS)}")
    for key in ("concept_sets", "measurements", "categoricals"):
        if not isinstance(features.get(key, []), list):
            raise r.fail(f"[features] {key}", "must be a list of tables ([[features.{key}]])")

    concept_sets = []
    for i, item in enumerate(features.get("concept_sets", [])):
        section = f"features.concept_sets[{i}]"
        if not isinstance(item, dict):
            raise r.fail(f"[{section}]", "must be a table")
        r.keys(item, section, {"name", "domain", "concepts", "descendants", "window", "aggregate"})
        domain = r.get(item, section, "domain", str)
        if domain not in DOMAIN_TABLES:
            raise r.fail(f"[{section}] domain", f"must be one of {', '.join(DOMAIN_TABLES)}")
        aggregate = r.get(item, section, "aggregate", str, "presence")
        if aggregate not in {"presence", "count"}:
            raise r.fail(f"[{section}] aggregate", "must be presence or count")
        concept_sets.append(ConceptSetFeature(
            r.name(item.get("name"), f"[{section}] name"), domain, r.concepts(item, section),
            r.get(item, section, "descendants", bool, True), r.window(item, section, (-365, 0)), aggregate,
        ))

    measurements = []
    for i, item in enumerate(features.get("measurements", [])):
        section = f"features.measurements[{i}]"
        if not isinstance(item, dict):
            raise r.fail(f"[{section}]", "must be a table")
        r.keys(item, section, {"name", "domain", "concepts", "unit", "analyte", "window", "aggregate", "range",
                               "descendants"})
        value_domain = r.get(item, section, "domain", str, "measurement")
        if value_domain not in VALUE_TABLES:
            raise r.fail(f"[{section}] domain", f"must be one of {', '.join(VALUE_TABLES)}")
        aggregate = r.get(item, section, "aggregate", str, "last")
        if aggregate not in VALUE_AGGREGATES:
            raise r.fail(f"[{section}] aggregate", f"must be one of {', '.join(VALUE_AGGREGATES)}")
        plausible = item.get("range")
        if plausible is not None and (not isinstance(plausible, list) or len(plausible) != 2
                                      or not all(isinstance(v, int | float) and not isinstance(v, bool)
                                                 and -1e308 < v < 1e308 for v in plausible)
                                      or plausible[0] >= plausible[1]):
            raise r.fail(f"[{section}] range", "must be [low, high], finite numbers in the canonical unit, low < high")
        unit, analyte = r.get(item, section, "unit", str), r.get(item, section, "analyte", str, None)
        _check_unit(r, section, unit, analyte)
        measurements.append(MeasurementFeature(
            r.name(item.get("name"), f"[{section}] name"), r.concepts(item, section), unit, analyte,
            r.window(item, section, (-365, 0)), aggregate,
            (float(plausible[0]), float(plausible[1])) if plausible else None,
            r.get(item, section, "descendants", bool, False), value_domain,
        ))

    categoricals = []
    for i, item in enumerate(features.get("categoricals", [])):
        section = f"features.categoricals[{i}]"
        if not isinstance(item, dict):
            raise r.fail(f"[{section}]", "must be a table")
        r.keys(item, section, {"name", "domain", "concepts", "levels", "window", "descendants"})
        value_domain = r.get(item, section, "domain", str, "observation")
        if value_domain not in VALUE_TABLES:
            raise r.fail(f"[{section}] domain", f"must be one of {', '.join(VALUE_TABLES)}")
        levels_raw = r.get(item, section, "levels", dict)
        if not levels_raw:
            raise r.fail(f"[{section}] levels", "must be a table of level = [value concept ids], e.g. "
                         "{ current = [4276526] }")
        levels: list[tuple[str, tuple[int, ...]]] = []
        seen: dict[int, str] = {}
        for label, ids in levels_raw.items():
            where = f"[{section}] levels.{str(label)[:40]}"
            if not LEVEL_RE.match(label):
                raise r.fail(where, "must be a lower-case level name (letters, digits, underscores)")
            if label == OTHER_LEVEL:
                raise r.fail(where, f"is generated ({OTHER_LEVEL!r} holds values in no level); rename it")
            ids = r.concepts({f"levels.{label}": ids}, section, f"levels.{label}")
            for c in ids:
                if c in seen:
                    raise r.fail(where, f"lists concept {c}, already in level {seen[c]}")
                seen[c] = label
            levels.append((label, ids))
        categoricals.append(CategoricalFeature(
            r.name(item.get("name"), f"[{section}] name"), value_domain, r.concepts(item, section), tuple(levels),
            r.window(item, section, (-365, 0)), r.get(item, section, "descendants", bool, False),
        ))
    names = [*demographics, *(f.name for f in concept_sets), *(m.name for m in measurements),
             *(c.name for c in categoricals)]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise r.fail("[features]", f"name {duplicates[0]!r} is used twice")

    categories_raw = r.table(data, "categories")
    categories = {"sex": ("male", "female")}
    for key, levels in categories_raw.items():
        if key != "sex":
            raise r.fail(f"[categories] {key[:40]}", "is not a categorical feature (only sex's levels are set here; "
                         "other categoricals are [[features.categoricals]] with their own levels)")
        if not isinstance(levels, list) or not levels:
            raise r.fail(f"[categories] {key}", "must be a non-empty list of level names")
        categories[key] = r.strings(categories_raw, "categories", key, [], pattern=LEVEL_RE,
                                    what="lower-case level names (letters, digits, underscores)")
    _check_generated_names(r, names, demographics, categories, measurements, categoricals)
    for c in categoricals:  # one-hot groups, as sex's: the release rule treats each group alike
        categories[c.name] = c.labels

    linking = r.table(data, "linking")
    r.keys(linking, "linking", {"images", "omics"})
    images = r.table(linking, "linking.images")
    r.keys(images, "linking.images", {"enabled", "modalities", "size", "window"})
    modalities = r.strings(images, "linking.images", "modalities", ["MR", "CT"], pattern=MODALITY_RE,
                           what="DICOM modality codes (e.g. MR, CT)")
    if not modalities:
        raise r.fail("[linking.images] modalities", "must list at least one DICOM modality code")
    imaging = ImagingSpec(
        r.get(images, "linking.images", "enabled", bool, False),
        modalities,
        r.integer(images, "linking.images", "size", 32, 4, 512),
        r.window(images, "linking.images", (-365, 0)),
    )
    omics_raw = r.table(linking, "linking.omics")
    r.keys(omics_raw, "linking.omics", {"enabled", "genes", "log1p"})
    genes = r.strings(omics_raw, "linking.omics", "genes", [], what="gene symbols")
    omics = OmicsSpec(r.get(omics_raw, "linking.omics", "enabled", bool, False), genes,
                      r.get(omics_raw, "linking.omics", "log1p", bool, True))
    if omics.enabled and not omics.genes:
        raise r.fail("[linking.omics] genes", "must list the study's genes when omics is enabled")

    v = r.table(data, "validation")
    r.keys(v, "validation", {"min_completeness", "fatal_completeness", "min_persons", "allow_fatal"})
    validation = ValidationSpec(
        r.number(v, "validation", "min_completeness", 0.5, 0.0, 1.0),
        r.number(v, "validation", "fatal_completeness", 0.0, 0.0, 1.0),
        r.integer(v, "validation", "min_persons", 10, 1, 10**9),
        r.get(v, "validation", "allow_fatal", bool, False),
    )
    if validation.fatal_completeness > validation.min_completeness:
        raise r.fail("[validation] fatal_completeness", "must not be above min_completeness")

    m = r.table(data, "model")
    r.keys(m, "model", {"kind", "hidden", "dropout", "l2"})
    kind = r.get(m, "model", "kind", str, "logistic")
    if kind not in MODELS:
        raise r.fail("[model] kind", f"must be one of {', '.join(MODELS)}")
    if kind in IMAGE_KINDS and not imaging.enabled:
        raise r.fail("[model] kind", f"{kind} needs [linking.images] enabled = true")
    if kind in IMAGE_KINDS and imaging.size < min_image_size(kind):
        raise r.fail("[linking.images] size", f"must be at least {min_image_size(kind)} for the {kind} model")
    hidden = r.get(m, "model", "hidden", list, [256, 512, 128, 64, 32])
    if not hidden or len(hidden) > 32 or not all(isinstance(h, int) and not isinstance(h, bool) and 1 <= h <= 65_536
                                                 for h in hidden):
        raise r.fail("[model] hidden", "must be a non-empty list (at most 32) of layer widths from 1 to 65,536")
    dropout = r.get(m, "model", "dropout", list, [0.4, 0.15])
    if not 1 <= len(dropout) <= 2 or not all(isinstance(d, int | float) and not isinstance(d, bool)
                                             and 0 <= d < 1 for d in dropout):
        raise r.fail("[model] dropout", "must be one or two rates in [0, 1)")
    model = ModelSpec(kind, tuple(hidden), tuple(float(d) for d in dropout),
                      r.number(m, "model", "l2", 0.0, 0.0, 1e6))

    t = r.table(data, "training")
    r.keys(t, "training", {"rounds", "local_epochs", "batch_size", "learning_rate", "strategy", "proximal_mu",
                           "min_sites", "test_fraction", "seed", "threshold", *_STRATEGY_KEYS})
    strategy = r.get(t, "training", "strategy", str, "fedavg")
    if strategy not in STRATEGIES:
        raise r.fail("[training] strategy", f"must be one of {', '.join(STRATEGIES)}")
    training = TrainingSpec(
        r.integer(t, "training", "rounds", 5, 1, 100_000), r.integer(t, "training", "local_epochs", 1, 1, 10_000),
        r.integer(t, "training", "batch_size", 64, 1, 10**7),
        r.number(t, "training", "learning_rate", 0.01, 0.0, 1e3, low_open=True),
        strategy, r.number(t, "training", "proximal_mu", 0.0, 0.0, 1e6),
        r.integer(t, "training", "min_sites", 2, 1, 100_000),
        r.number(t, "training", "test_fraction", 0.25, 0.0, 1.0, low_open=True, high_open=True),
        r.integer(t, "training", "seed", 0, 0, 2**32 - 1),
        r.number(t, "training", "threshold", 0.5, 0.0, 1.0, low_open=True, high_open=True),
    )
    if not 0.0 < training.threshold < 1.0:
        raise r.fail("[training] threshold", "must be a probability strictly between 0 and 1")
    training = _strategy_settings(r, t, training)
    split = _split(r, path, r.table(data, "split"), cohort_ids)
    if split.fixed and "test_fraction" in t:
        raise r.fail("[training] test_fraction", f"conflicts with [split] method = {split.method!r}, which fixes "
                     "the test set; remove it from [training]")
    privacy = _privacy(r, r.table(data, "privacy"))
    if privacy.dp_sgd and (training.strategy in SITE_STRATEGIES or training.local_steps or training.optimizer != "adam"
                           or training.weight_decay):
        raise r.fail("[training] strategy", "DP-SGD ([privacy] dp_sgd) trains with its own optimizer and local "
                     "epochs: use fedavg, fedprox or an adaptive strategy without optimizer/local_steps settings")
    if privacy.dp_sgd and model.kind in BATCHNORM_KINDS:
        raise r.fail("[privacy] dp_sgd", f"cannot train the {model.kind} model (DP-SGD cannot clip per person "
                     "through batch normalisation): choose another [model] kind or turn dp_sgd off")
    if privacy.secure_aggregation and training.strategy not in ("fedavg", "fedprox"):
        raise r.fail("[training] strategy", f"{training.strategy} cannot be combined with [privacy] secure_aggregation "
                     "= true (the coordinator sees only the summed update): use fedavg or fedprox")
    covariates = parse_covariates(r.table(data, "covariates"), path.parent, path) if "covariates" in data else None
    if covariates is not None and covariates.covariate_ids is not None and model.kind != "logistic":
        raise r.fail("[model] kind", "must be logistic in a study with a [covariates] list (sparse inputs)")
    return StudyConfig(
        privacy=privacy, covariates=covariates,
        name=name, description=description, target_cohort=target, outcome_cohort=outcome,
        time_at_risk=(tar[0], tar[1]), demographics=tuple(demographics), concept_sets=tuple(concept_sets),
        measurements=tuple(measurements), categories=categories, imaging=imaging, omics=omics,
        validation=validation, model=model, training=training, source=path, text=text, cohort_ids=cohort_ids,
        categoricals=tuple(categoricals), split=split,
    )
