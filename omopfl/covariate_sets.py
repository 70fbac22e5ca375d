"""FeatureExtraction's analyses and the study's ``[covariates]`` settings (pure: no database).

The analyses, their ids and what each reads are documented in :mod:`omopfl.covariates`, which builds
their SQL; this module holds only the definitions, so that the study parser can check a study without
importing a database driver.
"""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from omopfl.errors import ConfigError

__all__ = [
    "Analysis",
    "ANALYSES",
    "ANALYSIS_BY_NAME",
    "DEFAULT_SET",
    "CovariateSettings",
    "parse_analyses",
    "read_covariate_list",
    "write_covariate_list",
    "parse_covariates",
    "LIST_COLUMNS",
    "describe_covariate",
    "concept_based",
]


@dataclass(frozen=True)
class Analysis:
    """One FeatureExtraction analysis: its id, name and what it reads."""

    analysis_id: int
    name: str
    kind: str  # gender | age_group | race | ethnicity | year | month | group_condition | group_drug
    # | domain | visit_count | visit_concept_count
    window: str | None = None  # long | short | None (demographics)
    table: str = ""
    concept_column: str = ""
    start_column: str = ""
    end_column: str = ""
    binary: bool = True


def _domain(analysis_id: int, name: str, window: str, table: str, concept: str, date: str) -> Analysis:
    return Analysis(analysis_id, name, "domain", window, table, concept, date, date)


ANALYSES: dict[int, Analysis] = {a.analysis_id: a for a in (
    Analysis(1, "DemographicsGender", "gender"),
    Analysis(3, "DemographicsAgeGroup", "age_group"),
    Analysis(4, "DemographicsRace", "race"),
    Analysis(5, "DemographicsEthnicity", "ethnicity"),
    Analysis(6, "DemographicsIndexYear", "year"),
    Analysis(7, "DemographicsIndexMonth", "month"),
    Analysis(210, "ConditionGroupEraLongTerm", "group_condition", "long", "condition_era", "condition_concept_id",
             "condition_era_start_date", "condition_era_end_date"),
    Analysis(212, "ConditionGroupEraShortTerm", "group_condition", "short", "condition_era", "condition_concept_id",
             "condition_era_start_date", "condition_era_end_date"),
    Analysis(410, "DrugGroupEraLongTerm", "group_drug", "long", "drug_era", "drug_concept_id",
             "drug_era_start_date", "drug_era_end_date"),
    Analysis(412, "DrugGroupEraShortTerm", "group_drug", "short", "drug_era", "drug_concept_id",
             "drug_era_start_date", "drug_era_end_date"),
    _domain(502, "ProcedureOccurrenceLongTerm", "long", "procedure_occurrence", "procedure_concept_id",
            "procedure_date"),
    _domain(504, "ProcedureOccurrenceShortTerm", "short", "procedure_occurrence", "procedure_concept_id",
            "procedure_date"),
    _domain(702, "MeasurementLongTerm", "long", "measurement", "measurement_concept_id", "measurement_date"),
    _domain(704, "MeasurementShortTerm", "short", "measurement", "measurement_concept_id", "measurement_date"),
    _domain(802, "ObservationLongTerm", "long", "observation", "observation_concept_id", "observation_date"),
    _domain(804, "ObservationShortTerm", "short", "observation", "observation_concept_id", "observation_date"),
    Analysis(920, "VisitCountLongTerm", "visit_count", "long", "visit_occurrence", "visit_concept_id",
             "visit_start_date", "visit_end_date", binary=False),
    Analysis(922, "VisitCountShortTerm", "visit_count", "short", "visit_occurrence", "visit_concept_id",
             "visit_start_date", "visit_end_date", binary=False),
    Analysis(923, "VisitConceptCountLongTerm", "visit_concept_count", "long", "visit_occurrence", "visit_concept_id",
             "visit_start_date", "visit_end_date", binary=False),
    Analysis(925, "VisitConceptCountShortTerm", "visit_concept_count", "short", "visit_occurrence",
             "visit_concept_id", "visit_start_date", "visit_end_date", binary=False),
)}
ANALYSIS_BY_NAME: dict[str, Analysis] = {a.name: a for a in ANALYSES.values()}
DEFAULT_SET: tuple[int, ...] = (1, 3, 4, 5, 6, 7, 210, 212, 410, 412, 502, 504, 702, 704, 802, 804)

# FeatureExtraction's valid condition groups (DomainConceptGroup.sql): these descendants of "Clinical
# finding" count as groups even when they are only one or two levels below it.
CONDITION_GROUP_EXTRA = (433736, 433595, 441408, 72404, 192671, 137977, 434621, 437312, 439847, 4171917, 438555,
                          4299449, 375258, 76784, 40483532, 4145627, 434157, 433778, 258449, 313878)
GENERIC_CONDITION_NAMES = ("%finding", "Disorder of%", "Finding of%", "Disease of%", "Injury of%", "%by site",
                  "%by body site", "%by mechanism", "%of body region", "%of anatomical site",
                  "%of specific body structure%")
CLINICAL_FINDING = 441840


@dataclass(frozen=True)
class CovariateSettings:
    """The study's ``[covariates]``: analyses, windows and (after discovery) the fixed covariate list.

    ``covariate_ids`` is ``None`` before discovery (every covariate found is kept, e.g. for counting)
    and the sorted tuple of the study's list afterwards (the matrix's columns, in that order).
    """

    analyses: tuple[int, ...] = DEFAULT_SET
    long_term_days: int = 365
    short_term_days: int = 30
    end_days: int = 0
    covariate_ids: tuple[int, ...] | None = None
    list_file: str | None = None
    list_sha256: str = ""  # sha256 of the list file's bytes (part of the study hash)

    def window(self, which: str) -> tuple[int, int]:
        start = -self.long_term_days if which == "long" else -self.short_term_days
        return start, self.end_days


def parse_analyses(value: object, where: str) -> tuple[int, ...]:
    """``"default"`` or a list of analysis ids / names -> sorted analysis ids (ConfigError naming ``where``)."""
    if value == "default":
        return DEFAULT_SET
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where} must be \"default\" or a non-empty list of FeatureExtraction analysis ids or names")
    ids: set[int] = set()
    for item in value:
        if isinstance(item, str) and item in ANALYSIS_BY_NAME:
            ids.add(ANALYSIS_BY_NAME[item].analysis_id)
        elif isinstance(item, int) and not isinstance(item, bool) and item in ANALYSES:
            ids.add(item)
        else:
            known = ", ".join(f"{a.analysis_id} {a.name}" for a in ANALYSES.values())
            raise ConfigError(f"{where}: unknown analysis {item!r} (known: {known})")
    return tuple(sorted(ids))


def _int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ConfigError(f"{what} must be an integer")
    return int(value)




LIST_COLUMNS = ("covariate_id", "covariate_name", "analysis_id", "concept_id", "sites")
MAX_LIST = 1_000_000


def write_covariate_list(path: str | Path, rows: list[dict]) -> Path:
    """Write a covariate list CSV (columns :data:`LIST_COLUMNS`), sorted by covariate id."""
    path = Path(path)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(LIST_COLUMNS)
    for row in sorted(rows, key=lambda r: int(r["covariate_id"])):
        cid = int(row["covariate_id"])
        writer.writerow([cid, row.get("covariate_name", ""), cid % 1000, cid // 1000, int(row.get("sites", 0))])
    path.write_text(buffer.getvalue())
    return path


def read_covariate_list(path: Path, where: str) -> tuple[tuple[int, ...], str]:
    """Covariate ids of a list file (``omopfl covariates`` output) and the sha256 of its bytes.

    Errors name ``where`` (the study key) and the file.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{where}: {path} not found; run omopfl covariates to write it") from None
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path} ({type(exc).__name__})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: {path} is not UTF-8 text") from None
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if not header or header[0] != "covariate_id":
        raise ConfigError(f"{where}: {path} must be a CSV whose first column is covariate_id")
    ids: list[int] = []
    for number, row in enumerate(reader, start=2):
        if not row:
            continue
        try:
            cid = int(row[0])
        except ValueError:
            raise ConfigError(f"{where}: {path} line {number}: covariate_id must be an integer") from None
        if cid <= 0 or cid % 1000 not in ANALYSES:
            raise ConfigError(f"{where}: {path} line {number}: {cid} is not a covariate of a known analysis")
        ids.append(cid)
    if not ids or len(ids) > MAX_LIST:
        raise ConfigError(f"{where}: {path} must list from 1 to {MAX_LIST:,} covariates")
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{where}: {path} lists a covariate id twice")
    return tuple(sorted(ids)), hashlib.sha256(data).hexdigest()


def parse_covariates(table: dict, base: Path, source: Path) -> CovariateSettings:
    """The study's ``[covariates]`` table -> settings (errors name ``<study file>: [covariates] <key>``)."""

    def fail(key: str, problem: str) -> ConfigError:
        return ConfigError(f"{source}: [covariates] {key} {problem}")

    allowed = {"set", "analyses", "long_term_days", "short_term_days", "end_days", "list"}
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise fail(unknown[0], f"is not a known key; expected one of {', '.join(sorted(allowed))}")
    if "set" in table and "analyses" in table:
        raise fail("analyses", "and set are exclusive: give one")
    if "analyses" in table:
        analyses = parse_analyses(table["analyses"], f"{source}: [covariates] analyses")
    else:
        value = table.get("set", "default")
        if value != "default":
            raise fail("set", 'must be "default" (or give analyses = [...])')
        analyses = DEFAULT_SET
    days = {}
    for key, default, low, high in (("long_term_days", 365, 1, 100_000), ("short_term_days", 30, 1, 100_000),
                                    ("end_days", 0, -100_000, 100_000)):
        value = table.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise fail(key, f"must be an integer from {low} to {high:,}")
        days[key] = value
    if -days["long_term_days"] > days["end_days"] or -days["short_term_days"] > days["end_days"]:
        raise fail("end_days", "must not be before the start of the windows")
    ids, digest, list_file = None, "", None
    if "list" in table:
        value = table["list"]
        if not isinstance(value, str) or not value or "\x00" in value:
            raise fail("list", "must be the path of a covariate list file (omopfl covariates writes one)")
        path = Path(value) if Path(value).is_absolute() else base / value
        ids, digest = read_covariate_list(path, f"{source}: [covariates] list")
        unused = sorted({c % 1000 for c in ids} - set(analyses))
        if unused:
            raise fail("list", f"holds covariates of analysis {unused[0]}, which the study's analyses do not name")
        list_file = str(path)
    return CovariateSettings(tuple(analyses), days["long_term_days"], days["short_term_days"], days["end_days"],
                             ids, list_file, digest)


def concept_based(analysis_id: int) -> bool:
    """Is ``covariate_id // 1000`` a concept id for this analysis (not an age group, year, month or count)?"""
    return analysis_id in ANALYSES and analysis_id not in (3, 6, 7, 920, 922)


def describe_covariate(covariate_id: int, concept_name: str | None = None) -> str:
    """A name for a covariate id, e.g. ``DemographicsAgeGroup: 45-49``.

    ``concept_name``: the vocabulary's name of the concept (``""``: not in the vocabulary; ``None``: no
    vocabulary was asked, the name shows the concept id).
    """
    analysis_id, value = covariate_id % 1000, covariate_id // 1000
    analysis = ANALYSES.get(analysis_id)
    if analysis is None:
        return f"analysis {analysis_id}: {value}"
    if analysis_id == 3:
        return f"{analysis.name}: {value * 5}-{value * 5 + 4}"
    if analysis_id in (6, 7, 920, 922):
        return analysis.name if analysis_id in (920, 922) else f"{analysis.name}: {value}"
    if concept_name is None:  # no vocabulary at hand (the coordinator): the concept id
        return f"{analysis.name}: concept {value}"
    return f"{analysis.name}: {concept_name or 'Unknown concept'}"
