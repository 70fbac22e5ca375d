"""FeatureExtraction-style covariate sets, computed in the site's database into a sparse matrix.

A *covariate set* is a list of OHDSI FeatureExtraction analyses (``inst/csv/PrespecAnalyses.csv``);
each analysis turns a person's CDM records before index into binary (or count) covariates whose id is
FeatureExtraction's: ``covariate_id = concept_id * 1000 + analysis_id``.  The same SQL runs on
PostgreSQL and DuckDB and returns a long result ``(person_id, covariate_id, covariate_value)`` that is
read in chunks (a server-side cursor) straight into a :class:`scipy.sparse.csr_matrix`; no CDM table
is ever loaded into Python.

Analyses (windows are days relative to index, bounds included; ``long`` = ``-long_term_days``,
``short`` = ``-short_term_days``, both ending at ``end_days``):

=====  ================================  ===============================================================
id     name                              covariates
=====  ================================  ===============================================================
1      DemographicsGender                ``gender_concept_id * 1000 + 1`` (concept 0 left out)
3      DemographicsAgeGroup              ``FLOOR((YEAR(index) - year_of_birth) / 5) * 1000 + 3``
4      DemographicsRace                  ``race_concept_id * 1000 + 4`` (concept 0 left out)
5      DemographicsEthnicity             ``ethnicity_concept_id * 1000 + 5`` (concept 0 left out)
6      DemographicsIndexYear             ``YEAR(index) * 1000 + 6``
7      DemographicsIndexMonth            ``MONTH(index) * 1000 + 7``
210    ConditionGroupEraLongTerm         condition eras overlapping the window, rolled up to SNOMED groups
212    ConditionGroupEraShortTerm        (FE's valid groups: descendants of 441840 "Clinical finding" more
                                         than two levels below it, or on FE's list of 20, whose names are
                                         not generic - "Disorder of ...", "... by site" - and whose domain
                                         is Condition)
410    DrugGroupEraLongTerm              drug eras overlapping the window, rolled up to ATC classes (code
412    DrugGroupEraShortTerm             length 1, 3, 4 or 5) and standard RxNorm ingredients
502    ProcedureOccurrenceLongTerm       procedures whose ``procedure_date`` is in the window
504    ProcedureOccurrenceShortTerm
702    MeasurementLongTerm               measurements (presence) whose ``measurement_date`` is in the window
704    MeasurementShortTerm
802    ObservationLongTerm               observations (presence) whose ``observation_date`` is in the window
804    ObservationShortTerm
920    VisitCountLongTerm                number of visits overlapping the window, id ``1000 + 920``
922    VisitCountShortTerm               (a count, not binary)
923    VisitConceptCountLongTerm         the same count per ``visit_concept_id``
925    VisitConceptCountShortTerm
=====  ================================  ===============================================================

``set = "default"`` is FeatureExtraction's default set restricted to the analyses above (1, 3-7, 210,
212, 410, 412, 502, 504, 702, 704, 802, 804).

Deviations from FeatureExtraction, on purpose:

* the index date is the person's *first* entry in the target cohort (as everywhere in omopfl), so a
  person is one row; FeatureExtraction makes one row per cohort entry;
* FE's default set also holds DrugGroupEraOverlapping (413), DeviceExposure (602/604),
  MeasurementRangeGroup (710) and the comorbidity indices (901-904); they are not implemented here;
* the covariate names are built from the vocabulary's ``concept_name`` as FE does, but with a shorter
  prefix (the analysis name, then the concept name).

SQL safety: schema names go through :func:`omopfl.db.qualified`; analysis ids, windows and covariate
ids are integers from the parsed study, checked and inlined; nothing else enters the text.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import sqlalchemy as sa

from omopfl.config import SiteConfig
from omopfl.covariate_sets import (
    ANALYSES,
    CLINICAL_FINDING,
    CONDITION_GROUP_EXTRA,
    GENERIC_CONDITION_NAMES,
    Analysis,
    CovariateSettings,
    concept_based,
    describe_covariate,
)
from omopfl.db import describe_driver_error, existing_tables, qualified, sql_text
from omopfl.errors import ConfigError, DatabaseError

__all__ = [
    "CovariateMatrix",
    "covariate_query",
    "covariate_counts",
    "covariate_matrix",
    "covariate_names",
    "stream_covariates",
    "check_tables",
    "save_matrix",
    "persons_per_covariate",
    "load_matrix",
    "COVARIATES_FILE",
]

DEFAULT_CHUNK_ROWS = 100_000
COVARIATES_FILE = "covariates.npz"
"""The covariate matrix in a prepared dataset (rows in ``tabular.npz`` order; stays at the site)."""

def _int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ConfigError(f"{what} must be an integer")
    return int(value)


# --------------------------------------------------------------------------------------------
# SQL
# --------------------------------------------------------------------------------------------


def _target_cte(site: SiteConfig, target_id: int) -> str:
    cohort = qualified(site.results_schema, "cohort")
    return (f"target AS (SELECT c.subject_id AS person_id, MIN(c.cohort_start_date) AS index_date FROM {cohort} c"
            f" WHERE c.cohort_definition_id = {_int(target_id, 'target cohort id')} GROUP BY c.subject_id)")


def _person_cte(site: SiteConfig) -> str:
    person = qualified(site.cdm_schema, "person")
    return ("person_one AS (SELECT person_id, gender_concept_id, year_of_birth, race_concept_id, ethnicity_concept_id"
            " FROM (SELECT p.person_id, p.gender_concept_id, p.year_of_birth, p.race_concept_id,"
            " p.ethnicity_concept_id, ROW_NUMBER() OVER (PARTITION BY p.person_id ORDER BY p.year_of_birth,"
            " p.gender_concept_id) AS rn"
            f" FROM {person} p JOIN target t ON t.person_id = p.person_id) x WHERE rn = 1)")


def _condition_groups_cte(site: SiteConfig) -> str:
    ancestor = qualified(site.vocabulary_schema, "concept_ancestor")
    concept = qualified(site.vocabulary_schema, "concept")
    names = " AND ".join(f"c.concept_name NOT LIKE '{pattern}'" for pattern in GENERIC_CONDITION_NAMES)
    extra = ", ".join(str(c) for c in CONDITION_GROUP_EXTRA)
    return ("condition_groups AS (SELECT DISTINCT ca.descendant_concept_id, ca.ancestor_concept_id"
            f" FROM {ancestor} ca JOIN (SELECT c.concept_id FROM {concept} c JOIN {ancestor} f"
            f" ON f.descendant_concept_id = c.concept_id WHERE f.ancestor_concept_id = {CLINICAL_FINDING}"
            f" AND (f.min_levels_of_separation > 2 OR f.descendant_concept_id IN ({extra}))"
            f" AND {names} AND c.domain_id = 'Condition') g ON g.concept_id = ca.ancestor_concept_id)")


def _drug_groups_cte(site: SiteConfig) -> str:
    ancestor = qualified(site.vocabulary_schema, "concept_ancestor")
    concept = qualified(site.vocabulary_schema, "concept")
    return ("drug_groups AS (SELECT DISTINCT ca.descendant_concept_id, ca.ancestor_concept_id"
            f" FROM {ancestor} ca JOIN {concept} c ON c.concept_id = ca.ancestor_concept_id"
            " WHERE ((c.vocabulary_id = 'ATC' AND LENGTH(c.concept_code) IN (1, 3, 4, 5))"
            " OR (c.standard_concept = 'S' AND c.concept_class_id = 'Ingredient' AND c.domain_id = 'Drug'))"
            " AND c.concept_id <> 0)")


def _analysis_select(site: SiteConfig, a: Analysis, settings: CovariateSettings) -> str:
    """``SELECT person_id, covariate_id, covariate_value`` of one analysis."""
    aid = a.analysis_id
    year = "CAST(EXTRACT(YEAR FROM t.index_date) AS BIGINT)"
    person = "FROM target t JOIN person_one p ON p.person_id = t.person_id"
    if a.kind in ("gender", "race", "ethnicity"):
        column = f"p.{a.kind}_concept_id"
        return (f"SELECT t.person_id, CAST({column} AS BIGINT) * 1000 + {aid} AS covariate_id, 1 AS covariate_value"
                f" {person} WHERE {column} IS NOT NULL AND {column} <> 0")
    if a.kind == "age_group":
        return (f"SELECT t.person_id, CAST(FLOOR(({year} - p.year_of_birth) / 5.0) AS BIGINT) * 1000 + {aid}"
                f" AS covariate_id, 1 AS covariate_value {person} WHERE p.year_of_birth IS NOT NULL")
    if a.kind == "year":
        return f"SELECT t.person_id, {year} * 1000 + {aid} AS covariate_id, 1 AS covariate_value FROM target t"
    if a.kind == "month":
        return (f"SELECT t.person_id, CAST(EXTRACT(MONTH FROM t.index_date) AS BIGINT) * 1000 + {aid}"
                " AS covariate_id, 1 AS covariate_value FROM target t")
    low, high = (_int(d, "covariate window") for d in settings.window(a.window or "long"))
    events = qualified(site.cdm_schema, a.table)
    concept, start, end = f"e.{a.concept_column}", f"e.{a.start_column}", f"e.{a.end_column}"
    overlap = f"{start} <= t.index_date + {high} AND {end} >= t.index_date + {low}"
    join = f"FROM target t JOIN {events} e ON e.person_id = t.person_id"
    if a.kind in ("group_condition", "group_drug"):
        groups = "condition_groups" if a.kind == "group_condition" else "drug_groups"
        return (f"SELECT DISTINCT t.person_id, CAST(g.ancestor_concept_id AS BIGINT) * 1000 + {aid} AS covariate_id,"
                f" 1 AS covariate_value {join} JOIN {groups} g ON g.descendant_concept_id = {concept}"
                f" WHERE {overlap} AND {concept} <> 0")
    if a.kind == "domain":
        return (f"SELECT DISTINCT t.person_id, CAST({concept} AS BIGINT) * 1000 + {aid} AS covariate_id,"
                f" 1 AS covariate_value {join} WHERE {overlap} AND {concept} <> 0")
    if a.kind == "visit_count":
        return (f"SELECT t.person_id, CAST(1000 + {aid} AS BIGINT) AS covariate_id, COUNT(*) AS covariate_value"
                f" {join} WHERE {overlap} GROUP BY t.person_id")
    if a.kind == "visit_concept_count":
        return (f"SELECT t.person_id, CAST({concept} AS BIGINT) * 1000 + {aid} AS covariate_id,"
                f" COUNT(*) AS covariate_value {join} WHERE {overlap} AND {concept} <> 0"
                f" GROUP BY t.person_id, {concept}")
    raise ConfigError(f"analysis {aid} has no SQL")  # pragma: no cover - ANALYSES is closed


def covariate_query(site: SiteConfig, target_id: int, settings: CovariateSettings, *, aggregate: bool = False) -> str:
    """The covariate query (same SQL on PostgreSQL and DuckDB).

    Parameters
    ----------
    site:
        Schemas of the CDM, vocabulary and results (cohort table).
    target_id:
        ``cohort_definition_id`` of the target cohort in ``<results>.cohort``.
    settings:
        Analyses and windows; when ``settings.covariate_ids`` is set, only those covariates are returned.
    aggregate:
        ``False``: rows ``(person_id, covariate_id, covariate_value)`` ordered by person and covariate.
        ``True``: rows ``(covariate_id, persons)``: the number of distinct persons holding each covariate.

    Returns
    -------
    str
        Plain SQL with every value inlined (all are checked integers).
    """
    if not settings.analyses:
        raise ConfigError("[covariates] names no analysis")
    analyses = [ANALYSES[a] for a in settings.analyses]
    ctes = [_target_cte(site, target_id)]
    kinds = {a.kind for a in analyses}
    if kinds & {"gender", "race", "ethnicity", "age_group"}:
        ctes.append(_person_cte(site))
    if "group_condition" in kinds:
        ctes.append(_condition_groups_cte(site))
    if "group_drug" in kinds:
        ctes.append(_drug_groups_cte(site))
    ctes.append("cov AS (" + "\nUNION ALL\n".join(_analysis_select(site, a, settings) for a in analyses) + ")")
    where = ""
    if settings.covariate_ids is not None:
        ids = [_int(c, "covariate id") for c in settings.covariate_ids]
        if not ids:
            raise ConfigError("[covariates] list holds no covariate")
        ctes.append("wanted(covariate_id) AS (VALUES " + ", ".join(f"(CAST({c} AS BIGINT))" for c in ids) + ")")
        where = " WHERE cov.covariate_id IN (SELECT covariate_id FROM wanted)"
    head = "WITH " + ",\n".join(ctes) + "\n"
    if aggregate:
        return head + f"SELECT cov.covariate_id, COUNT(DISTINCT cov.person_id) AS persons FROM cov{where}" \
                      " GROUP BY cov.covariate_id ORDER BY cov.covariate_id"
    return head + ("SELECT cov.person_id, cov.covariate_id, CAST(cov.covariate_value AS DOUBLE PRECISION)"
                   f" AS covariate_value FROM cov{where} ORDER BY cov.person_id, cov.covariate_id")


# --------------------------------------------------------------------------------------------
# running it
# --------------------------------------------------------------------------------------------


def _failed(site: SiteConfig, what: str, exc: BaseException) -> DatabaseError:
    return DatabaseError(f"site {site.name}: {what} failed: {describe_driver_error(exc)}")


def check_tables(conn: sa.Connection, site: SiteConfig, settings: CovariateSettings) -> None:
    """Refuse, naming the analysis and the table, a covariate set that reads a table the site's CDM lacks."""
    needed: dict[tuple[str, str], int] = {(site.results_schema, "cohort"): 0}
    for aid in settings.analyses:
        a = ANALYSES[aid]
        if a.table:
            needed.setdefault((site.cdm_schema, a.table), aid)
        if a.kind in ("group_condition", "group_drug"):
            needed.setdefault((site.vocabulary_schema, "concept_ancestor"), aid)
            needed.setdefault((site.vocabulary_schema, "concept"), aid)
        if a.kind in ("gender", "race", "ethnicity", "age_group"):
            needed.setdefault((site.cdm_schema, "person"), aid)
    present: dict[str, set[str]] = {}
    for (schema, table), aid in needed.items():
        if schema not in present:
            present[schema] = existing_tables(conn, schema)
        if table not in present[schema]:
            what = f"analysis {aid} ({ANALYSES[aid].name})" if aid else "the covariate query"
            raise DatabaseError(f"site {site.name}: [covariates] {what} reads {schema}.{table}, which the database "
                                "lacks; remove the analysis from the study or add the table")


def stream_covariates(conn: sa.Connection, site: SiteConfig, target_id: int, settings: CovariateSettings, *,
                      chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Iterator[np.ndarray]:
    """Yield chunks of the long result as ``(rows, 3)`` float64 arrays ``person_id, covariate_id, value``.

    Rows come through a server-side cursor (``yield_per``), at most ``chunk_rows`` at a time.
    """
    sql = covariate_query(site, target_id, settings)
    check_tables(conn, site, settings)
    try:
        if conn.dialect.name == "postgresql":
            # A server-side cursor is planned for its first 10% of rows by default; every row is fetched here,
            # so plan for all of them (bench/covariates_bench.py shows the difference).
            conn.exec_driver_sql("SET LOCAL cursor_tuple_fraction = 1.0")
        result = conn.execution_options(yield_per=chunk_rows).execute(sa.text(sql))
        while True:
            rows = result.fetchmany(chunk_rows)
            if not rows:
                break
            # tuples first: numpy reads SQLAlchemy Row objects one by one, about 40 us a row
            yield np.array([tuple(r) for r in rows], dtype=np.float64).reshape(-1, 3)
    except sa.exc.DBAPIError as exc:
        raise _failed(site, "covariate query", exc) from None


def covariate_counts(conn: sa.Connection, site: SiteConfig, target_id: int,
                     settings: CovariateSettings) -> dict[int, int]:
    """Covariate id -> number of distinct target persons holding it (stays at the site; see
    :func:`omopfl.release.covariate_ids` for what may leave)."""
    check_tables(conn, site, settings)
    try:
        rows = conn.execute(sa.text(covariate_query(site, target_id, settings, aggregate=True))).fetchall()
    except sa.exc.DBAPIError as exc:
        raise _failed(site, "covariate count query", exc) from None
    return {int(c): int(n) for c, n in rows}


@dataclass
class CovariateMatrix:
    """Sparse covariates of the persons of a feature frame: row ``i`` is ``person_ids[i]``."""

    matrix: sp.csr_matrix  # float32, persons x covariates
    covariate_ids: np.ndarray  # int64, the columns


def covariate_matrix(conn: sa.Connection, site: SiteConfig, target_id: int, settings: CovariateSettings,
                     person_ids: Sequence[int] | np.ndarray, *,
                     chunk_rows: int = DEFAULT_CHUNK_ROWS) -> CovariateMatrix:
    """Build the CSR matrix of ``settings.covariate_ids`` (or of every covariate found, sorted).

    ``person_ids`` are the rows (any order; e.g. the feature frame's); a person without any covariate
    gets an empty row, and rows of persons not in ``person_ids`` are dropped.  Memory: the long result's
    non-zeros (three arrays), never persons x covariates.
    """
    persons = np.asarray(person_ids, dtype=np.int64)
    order = np.argsort(persons, kind="stable")
    sorted_persons = persons[order]
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    vals: list[np.ndarray] = []
    for chunk in stream_covariates(conn, site, target_id, settings, chunk_rows=chunk_rows):
        pid = chunk[:, 0].astype(np.int64)
        pos = np.searchsorted(sorted_persons, pid)
        pos_clipped = np.minimum(pos, max(len(sorted_persons) - 1, 0))
        keep = (pos < len(sorted_persons)) & (sorted_persons[pos_clipped] == pid) if len(sorted_persons) else \
            np.zeros(len(pid), dtype=bool)
        rows.append(order[pos_clipped[keep]])
        cols.append(chunk[keep, 1].astype(np.int64))
        vals.append(chunk[keep, 2].astype(np.float32))
    row = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    cov = np.concatenate(cols) if cols else np.zeros(0, dtype=np.int64)
    val = np.concatenate(vals) if vals else np.zeros(0, dtype=np.float32)
    ids = np.asarray(settings.covariate_ids, dtype=np.int64) if settings.covariate_ids is not None \
        else np.unique(cov)
    ids = np.unique(ids)
    col = np.searchsorted(ids, cov)
    matrix = sp.csr_matrix((val, (row, col)), shape=(len(persons), len(ids)), dtype=np.float32)
    matrix.sum_duplicates()
    return CovariateMatrix(matrix, ids)


def covariate_names(conn: sa.Connection, site: SiteConfig, covariate_ids: Iterable[int]) -> dict[int, str]:
    """Covariate id -> a readable name from the vocabulary (``<analysis name>: <concept name>``).

    Demographic ids that are not concepts (age group, year, month) and visit counts get names without
    the vocabulary.  Concepts absent from the site's vocabulary are named ``Unknown concept``.
    """
    ids = sorted({_int(c, "covariate id") for c in covariate_ids})
    concept_ids = sorted({c // 1000 for c in ids if concept_based(c % 1000)})
    names: dict[int, str] = {}
    if concept_ids:
        concept = qualified(site.vocabulary_schema, "concept")
        for start in range(0, len(concept_ids), 1000):
            part = concept_ids[start:start + 1000]
            query = sa.text(sql_text("concept_names", concept=concept)).bindparams(sa.bindparam("ids", expanding=True))
            try:
                for cid, name in conn.execute(query, {"ids": part}):
                    names[int(cid)] = str(name)
            except sa.exc.DBAPIError as exc:
                raise _failed(site, "covariate name query", exc) from None
    return {c: describe_covariate(c, names.get(c // 1000, "")) for c in ids}


def save_matrix(path: Path, cm: CovariateMatrix) -> None:
    """Write a covariate matrix (CSR arrays, shape, covariate ids) to one ``.npz`` file."""
    m = cm.matrix.tocsr()
    with open(path, "wb") as fh:
        np.savez(fh, data=m.data.astype(np.float32), indices=m.indices.astype(np.int32),
                 indptr=m.indptr.astype(np.int64), shape=np.asarray(m.shape, dtype=np.int64),
                 covariate_ids=cm.covariate_ids.astype(np.int64))


def load_matrix(path: Path) -> CovariateMatrix:
    """Inverse of :func:`save_matrix` (no pickles)."""
    with np.load(path, allow_pickle=False) as z:
        shape = tuple(int(v) for v in z["shape"])
        matrix = sp.csr_matrix((z["data"], z["indices"], z["indptr"]), shape=shape)
        return CovariateMatrix(matrix, z["covariate_ids"].copy())


def persons_per_covariate(cm: CovariateMatrix) -> dict[int, int]:
    """Covariate id -> persons with a non-zero value (each row is one person)."""
    m = cm.matrix.tocsr()
    counts = np.bincount(m.indices[m.data != 0], minlength=m.shape[1])
    return {int(c): int(n) for c, n in zip(cm.covariate_ids, counts, strict=True)}
