"""OHDSI cohort definitions, built inside the site's database.

Definitions come as ATLAS/CIRCE JSON (bare, or wrapped as ATLAS/WebAPI exports them) or in a
short YAML form (:mod:`omopfl.cohort_yaml`) that maps onto the same CIRCE model.  A maintained
translator turns the CIRCE expression into SQL for the site's dialect: ``duckcdm`` (the default)
or OHDSI's ``ohdsi-circepy`` (used by the tests as a cross-check).  The SQL runs where the data
lives; no row is pulled into Python.  Translated SQL is cached on disk per definition hash,
dialect, schemas, cohort id and translator.

A build writes the results schema in ONE transaction: the cohort rows, the inclusion-rule
attrition tables and a ``cohort_definition`` row (name, hash, counts).  If anything fails, the
transaction is rolled back and the previous cohort is intact.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from omopfl.cdm import create_results
from omopfl.config import SiteConfig, check_identifier
from omopfl.db import describe_driver_error, qualified, sql_text
from omopfl.errors import ConfigError, DatabaseError, DataError

__all__ = [
    "TRANSLATORS",
    "CohortDefinition",
    "BuildResult",
    "CohortSummary",
    "CohortDetail",
    "load_definition",
    "parse_definition",
    "render_sql",
    "build_cohorts",
    "list_cohorts",
    "show_cohort",
    "mask_count",
]

TRANSLATORS: tuple[str, ...] = ("duckcdm", "circepy")
DIALECTS: dict[str, str] = {"duckdb": "duckdb", "postgresql": "postgresql"}
STATEMENT_TIMEOUT_MS = int(os.environ.get("OMOPFL_STATEMENT_TIMEOUT_MS", 3_600_000))
_LEFTOVER = re.compile(r"@\w+|\{[^{}]*\}\s*\?\s*\{")
_QUOTED = re.compile(r"'(?:[^']|'')*'")
_CRITERIA_DOMAINS = {
    "ConditionOccurrence", "ConditionEra", "DrugExposure", "DrugEra", "DoseEra", "ProcedureOccurrence",
    "Measurement", "Observation", "VisitOccurrence", "VisitDetail", "DeviceExposure", "Specimen", "Death",
    "ObservationPeriod", "PayerPlanPeriod", "LocationRegion",
}


# --------------------------------------------------------------------------- definitions
@dataclass(frozen=True)
class CohortDefinition:
    """A cohort definition: its name, its CIRCE expression and where it came from."""

    name: str
    expression: dict[str, Any]
    source: str
    default_id: int | None = None

    @property
    def canonical_json(self) -> str:
        return json.dumps(self.expression, sort_keys=True, separators=(",", ":"))

    @property
    def hash(self) -> str:
        """sha256 of the canonical JSON of the expression (names and file paths do not count)."""
        return hashlib.sha256(self.canonical_json.encode()).hexdigest()

    @property
    def inclusion_rules(self) -> list[tuple[str, str]]:
        rules = self.expression.get("InclusionRules") or []
        return [(str(r.get("name") or f"rule {i}"), str(r.get("description") or "")) for i, r in enumerate(rules)]

    def concept_ids(self) -> dict[str, list[int]]:
        """Concept ids listed in each concept set (included and excluded items)."""
        out: dict[str, list[int]] = {}
        for concept_set in self.expression.get("ConceptSets") or []:
            items = (concept_set.get("expression") or {}).get("items") or []
            ids = []
            for item in items:
                concept = item.get("concept") or {}
                value = concept.get("CONCEPT_ID", concept.get("conceptId"))
                if isinstance(value, int) and not isinstance(value, bool):
                    ids.append(value)
            out[str(concept_set.get("name") or concept_set.get("id"))] = ids
        return out

    def primary_codeset_ids(self) -> set[int]:
        ids: set[int] = set()
        for criterion in (self.expression.get("PrimaryCriteria") or {}).get("CriteriaList") or []:
            for body in criterion.values():
                if isinstance(body, dict) and isinstance(body.get("CodesetId"), int):
                    ids.add(body["CodesetId"])
        return ids


MAX_DEPTH = 100  # nesting levels of a definition (ATLAS exports use fewer than 20)
MAX_CONCEPT_ID = 2**31 - 1  # OMOP concept_id is a 32-bit integer
_CODESET_KEYS = ("CodesetId", "DrugCodesetId")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _walk(expression: dict[str, Any], where: str) -> list[tuple[str, int]]:
    """Check nesting depth and finiteness everywhere; return every concept-set reference ``(path, id)``.

    Iterative, so a deeply nested document gives an error, not a RecursionError.
    """
    references: list[tuple[str, int]] = []
    stack: list[tuple[Any, str, int]] = [(expression, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise DataError(f"{where}: the definition is nested more than {MAX_DEPTH} levels deep (at {path[:80]}...)")
        if isinstance(value, dict):
            for key, item in value.items():
                child = f"{path}.{key}" if path else str(key)
                if key in _CODESET_KEYS and item is not None:
                    if not _is_int(item):
                        raise DataError(f"{where}: {child} must be a concept set id (an integer) or null")
                    references.append((child, item))
                stack.append((item, child, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value))
        elif isinstance(value, float) and not math.isfinite(value):
            raise DataError(f"{where}: {path} must be a finite number")
    return references


def _check_concept_sets(expression: dict[str, Any], where: str) -> set[int]:
    concept_sets = expression.get("ConceptSets")
    if concept_sets is None:
        return set()
    if not isinstance(concept_sets, list):
        raise DataError(f"{where}: ConceptSets must be a list of concept sets")
    ids: set[int] = set()
    for i, concept_set in enumerate(concept_sets):
        key = f"ConceptSets[{i}]"
        if not isinstance(concept_set, dict) or "id" not in concept_set:
            raise DataError(f"{where}: {key} needs an id and an expression")
        if not _is_int(concept_set["id"]):
            raise DataError(f"{where}: {key}.id must be an integer")
        if concept_set["id"] in ids:
            raise DataError(f"{where}: {key}.id {concept_set['id']} is used by two concept sets")
        ids.add(concept_set["id"])
        if "name" in concept_set and not isinstance(concept_set["name"], str | None):
            raise DataError(f"{where}: {key}.name must be a string")
        body = concept_set.get("expression")
        if body is None:
            continue
        if not isinstance(body, dict):
            raise DataError(f"{where}: {key}.expression must be an object with items")
        items = body.get("items")
        if items is None:
            continue
        if not isinstance(items, list):
            raise DataError(f"{where}: {key}.expression.items must be a list")
        for j, item in enumerate(items):
            item_key = f"{key}.expression.items[{j}]"
            if not isinstance(item, dict) or not isinstance(item.get("concept"), dict):
                raise DataError(f"{where}: {item_key} must be an object with a concept")
            concept = item["concept"]
            value = concept.get("CONCEPT_ID", concept.get("conceptId"))
            if not _is_int(value) or not 0 <= value <= MAX_CONCEPT_ID:
                raise DataError(f"{where}: {item_key}.concept.CONCEPT_ID must be an integer concept id "
                                f"(0 to {MAX_CONCEPT_ID})")
            for flag in ("isExcluded", "includeDescendants", "includeMapped"):
                if flag in item and not isinstance(item[flag], bool | None):
                    raise DataError(f"{where}: {item_key}.{flag} must be true or false")
    return ids


def _check_expression(expression: Any, where: str) -> dict[str, Any]:
    """Refuse, naming the key, a CIRCE expression that cannot be served (shape, types, references)."""
    if not isinstance(expression, dict):
        raise DataError(f"{where}: a cohort definition must be a JSON object with PrimaryCriteria")
    references = _walk(expression, where)
    primary = expression.get("PrimaryCriteria")
    if not isinstance(primary, dict):
        raise DataError(f"{where}: PrimaryCriteria is missing or not an object")
    criteria = primary.get("CriteriaList")
    if not isinstance(criteria, list) or not criteria:
        raise DataError(f"{where}: PrimaryCriteria.CriteriaList must be a non-empty list of criteria")
    for i, criterion in enumerate(criteria):
        if not isinstance(criterion, dict) or len(criterion) != 1:
            raise DataError(f"{where}: PrimaryCriteria.CriteriaList[{i}] must hold exactly one criterion")
        ((kind, body),) = criterion.items()
        if kind not in _CRITERIA_DOMAINS:
            raise DataError(
                f"{where}: unsupported criterion {str(kind)[:40]!r} in PrimaryCriteria.CriteriaList[{i}]; "
                f"supported: {', '.join(sorted(_CRITERIA_DOMAINS))}"
            )
        if not isinstance(body, dict):
            raise DataError(f"{where}: PrimaryCriteria.CriteriaList[{i}].{kind} must be an object")
    for key in ("InclusionRules", "CensoringCriteria"):
        value = expression.get(key)
        if value is not None and (not isinstance(value, list) or not all(isinstance(v, dict) for v in value)):
            raise DataError(f"{where}: {key} must be a list of objects")
    for i, rule in enumerate(expression.get("InclusionRules") or []):
        if not isinstance(rule.get("expression"), dict | None):
            raise DataError(f"{where}: InclusionRules[{i}].expression must be an object")
        if not isinstance(rule.get("name"), str | None):
            raise DataError(f"{where}: InclusionRules[{i}].name must be a string")
    for key in ("EndStrategy", "CollapseSettings", "CensorWindow", "QualifiedLimit", "ExpressionLimit",
                "AdditionalCriteria"):
        if expression.get(key) is not None and not isinstance(expression[key], dict):
            raise DataError(f"{where}: {key} must be an object")
    ids = _check_concept_sets(expression, where)
    for path, codeset in references:
        if codeset not in ids:
            raise DataError(f"{where}: {path} = {codeset} names no concept set in ConceptSets; "
                            "fix the id or add the concept set")
    return expression


def load_definition(path: str | Path) -> CohortDefinition:
    """Read a cohort definition file (CIRCE JSON, ATLAS export, or the short YAML form).

    Raises
    ------
    DataError
        Malformed file, naming the file and what is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: cohort definition file not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; save the definition as UTF-8") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read the cohort definition ({type(exc).__name__})") from None
    return parse_definition(text, path)


def _parse_json(text: str, where: str) -> Any:
    def refuse(constant: str) -> Any:
        raise DataError(f"{where}: {constant} is not a number JSON allows; use a finite number")

    try:
        return json.loads(text, parse_constant=refuse)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except RecursionError:
        raise DataError(f"{where}: the definition is nested too deeply") from None


def parse_definition(text: str, path: str | Path) -> CohortDefinition:
    """Parse the text of a cohort definition file (``path`` names it and chooses JSON or YAML by suffix).

    Raises
    ------
    DataError
        Malformed definition, naming the file and the key.
    """
    path = Path(path)
    where = str(path)
    stem = path.stem
    default_id = int(stem) if stem.isascii() and stem.isdigit() else None
    if path.suffix.lower() in {".yaml", ".yml"}:
        from omopfl.cohort_yaml import yaml_to_circe

        name, expression, yaml_id = yaml_to_circe(text, where)
        return CohortDefinition(name, _check_expression(expression, where), where, yaml_id or default_id)
    document = _parse_json(text, where)
    name = stem
    if isinstance(document, dict) and "PrimaryCriteria" not in document and "expression" in document:
        if document.get("name") is not None and not isinstance(document["name"], str):
            raise DataError(f"{where}: name must be a string")
        name = document.get("name") or name
        if document.get("id") is not None:
            if not _is_int(document["id"]) or not 0 < document["id"] < 2**31:
                raise DataError(f"{where}: id must be a positive 32-bit integer")
            default_id = document["id"]
        document = document["expression"]
        if isinstance(document, str):  # WebAPI stores the expression as a JSON string
            document = _parse_json(document, f"{where}: expression")
    return CohortDefinition(name, _check_expression(document, where), where, default_id)


# --------------------------------------------------------------------------- translation
def _cache_dir() -> Path:
    root = os.environ.get("OMOPFL_CACHE_DIR")
    base = Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "omopfl"
    return base / "cohort_sql"


def _translator_version(translator: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    package = {"duckcdm": "duckcdm", "circepy": "ohdsi-circepy"}[translator]
    try:
        return version(package)
    except PackageNotFoundError:
        raise ConfigError(
            f"cohort translator {translator} is not installed (pip install {package}); "
            "use --translator duckcdm"
        ) from None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:240] + ("..." if len(text) > 240 else "")


def _translate_duckcdm(
    expression_json: str, dialect: str, cdm: str, vocab: str, results: str, cohort_id: int, where: str
) -> str:
    from duckcdm.circe import CirceError, build_cohort_query
    from duckcdm.sqlrender import JavaError, render, translate

    try:
        ohdsi = build_cohort_query(
            expression_json, cdm_schema=cdm, vocabulary_schema=vocab, result_schema=results,
            target_table=f"{results}.cohort", cohort_id=cohort_id, generate_stats=True,
        )
        return translate(render(ohdsi), DIALECTS[dialect])
    except (CirceError, JavaError) as exc:
        raise DataError(f"{where}: cannot translate the cohort definition ({_one_line(exc)})") from None
    except (RecursionError, MemoryError):
        raise DataError(f"{where}: cannot translate the cohort definition (too large or too deeply nested)") from None
    except Exception as exc:  # the translator's own bugs on unusual input: one line, naming the type only
        raise DataError(f"{where}: cannot translate the cohort definition ({type(exc).__name__}); "
                        "check the values of its fields") from None


def _translate_circepy(
    expression_json: str, dialect: str, cdm: str, vocab: str, results: str, cohort_id: int, where: str
) -> str:
    from circe.api import build_cohort_query, cohort_expression_from_json
    from circe.cohortdefinition import BuildExpressionQueryOptions
    from circe.sqlrender import render, translate

    options = BuildExpressionQueryOptions()
    options.cdm_schema, options.vocabulary_schema, options.result_schema = cdm, vocab, results
    options.target_table, options.cohort_id, options.generate_stats = f"{results}.cohort", cohort_id, True
    try:
        return translate(render(build_cohort_query(cohort_expression_from_json(expression_json), options)),
                         DIALECTS[dialect])
    except Exception as exc:  # circepy raises bare ValueError/AttributeError/RuntimeError
        raise DataError(f"{where}: cannot translate the cohort definition ({type(exc).__name__})") from None


def _split(sql: str, translator: str) -> list[str]:
    if translator == "duckcdm":
        from duckcdm.sqlrender import split_sql
    else:
        from circe.sqlrender import split_sql
    return [s.strip() for s in split_sql(sql) if s.strip()]


def render_sql(
    definition: CohortDefinition,
    dialect: str,
    cdm_schema: str,
    vocabulary_schema: str,
    results_schema: str,
    cohort_id: int,
    translator: str = "duckcdm",
    use_cache: bool = True,
) -> list[str]:
    """Translate a definition to the statements that build it (cached on disk).

    The statements write ``<results_schema>.cohort`` and the attrition tables for ``cohort_id``;
    run them in order, in one transaction, on one connection.
    """
    if dialect not in DIALECTS:
        raise ConfigError(f"cohorts: database {dialect!r} is not supported; use PostgreSQL or DuckDB")
    if translator not in TRANSLATORS:
        raise ConfigError(f"cohorts: unknown translator {translator!r}; choose one of {', '.join(TRANSLATORS)}")
    for value, what in ((cdm_schema, "cdm schema"), (vocabulary_schema, "vocabulary schema"),
                        (results_schema, "results schema")):
        check_identifier(value, what)
    if isinstance(cohort_id, bool) or not isinstance(cohort_id, int) or not 0 < cohort_id < 2**31:
        raise DataError(f"{definition.source}: cohort id must be a positive 32-bit integer")
    key_material = json.dumps(
        [definition.hash, dialect, cdm_schema, vocabulary_schema, results_schema, cohort_id, translator,
         _translator_version(translator)]
    )
    key = hashlib.sha256(key_material.encode()).hexdigest()
    cache_file = _cache_dir() / f"{key}.json"
    if use_cache and cache_file.is_file():
        try:
            cached = json.loads(cache_file.read_text())
            if isinstance(cached, list) and all(isinstance(s, str) for s in cached):
                return cached
        except (OSError, json.JSONDecodeError):
            pass  # a damaged cache entry is rebuilt
    translate = _translate_duckcdm if translator == "duckcdm" else _translate_circepy
    sql = translate(definition.canonical_json, dialect, cdm_schema, vocabulary_schema, results_schema, cohort_id,
                    definition.source)
    statements = _split(sql, translator)
    if any(_LEFTOVER.search(_QUOTED.sub("''", s)) for s in statements):
        raise DataError(f"{definition.source}: translated SQL still holds unrendered parameters; report this")
    if use_cache:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(statements))
            tmp.replace(cache_file)
        except OSError:
            pass  # caching is an optimisation only
    return statements


# --------------------------------------------------------------------------- build
@dataclass
class BuildResult:
    """What one cohort build did."""

    cohort_id: int
    name: str
    definition_hash: str
    translator: str
    person_count: int
    record_count: int
    statements: int
    seconds: float
    warnings: list[str] = field(default_factory=list)

    def to_dict(self, min_cell_count: int | None = None) -> dict[str, Any]:
        data = asdict(self)
        if min_cell_count is not None:
            data["person_count"] = mask_count(self.person_count, min_cell_count)
            data["record_count"] = mask_count(self.record_count, min_cell_count)
        return data


def mask_count(count: int | None, min_cell_count: int) -> int | str | None:
    """Small-cell suppression for display: a count below ``min_cell_count`` prints as ``<N``."""
    if count is None:
        return None
    return f"<{min_cell_count}" if count < min_cell_count else int(count)


def _existing_ids(conn: sa.Connection, results: str, ids: Sequence[int]) -> dict[int, str]:
    table = qualified(results, "cohort_definition")
    rows = conn.execute(
        sa.text(sql_text("cohort_definitions_with_ids", cohort_definition=table))
        .bindparams(sa.bindparam("ids", expanding=True)),
        {"ids": list(ids)},
    ).all()
    found = {int(r[0]): str(r[1]) for r in rows}
    cohort = qualified(results, "cohort")
    rows = conn.execute(
        sa.text(sql_text("cohort_ids_with_rows", cohort=cohort))
        .bindparams(sa.bindparam("ids", expanding=True)),
        {"ids": list(ids)},
    ).scalars()
    for cohort_id in rows:
        found.setdefault(int(cohort_id), "(built outside omopfl)")
    return found


def _concept_warnings(conn: sa.Connection, site: SiteConfig, definition: CohortDefinition) -> list[str]:
    """Check concept ids against the site's vocabulary.

    An entry concept set with none of its concepts in the vocabulary makes the cohort empty by
    construction: that is an error.  Other unknown ids are warnings (vocabularies differ by site).
    """
    by_set = definition.concept_ids()
    all_ids = sorted({i for ids in by_set.values() for i in ids})
    if not all_ids:
        return []
    concept = qualified(site.vocabulary_schema, "concept")
    known: set[int] = set()
    for start in range(0, len(all_ids), 5000):
        chunk = all_ids[start:start + 5000]
        known |= {int(x) for x in conn.execute(
            sa.text(sql_text("known_concept_ids", concept=concept))
            .bindparams(sa.bindparam("ids", expanding=True)),
            {"ids": chunk},
        ).scalars()}
    warnings = []
    primary = definition.primary_codeset_ids()
    sets = definition.expression.get("ConceptSets") or []
    for concept_set in sets:
        name = str(concept_set.get("name") or concept_set.get("id"))
        ids = by_set.get(name, [])
        unknown = [i for i in ids if i not in known]
        if not unknown:
            continue
        if len(unknown) == len(ids) and concept_set.get("id") in primary:
            raise DataError(
                f"{definition.source}: concept set {name!r} (used for cohort entry) has no concept id known to "
                f"the vocabulary of site {site.name} (unknown: {', '.join(map(str, unknown[:5]))}"
                f"{', ...' if len(unknown) > 5 else ''}); check the ids or load the vocabulary"
            )
        warnings.append(f"concept set {name!r}: {len(unknown)} of {len(ids)} concept ids not in the vocabulary")
    return warnings


def build_cohorts(
    engine: sa.Engine,
    site: SiteConfig,
    requests: Sequence[tuple[CohortDefinition, int]],
    *,
    replace: bool = False,
    translator: str = "duckcdm",
    progress: bool = False,
) -> list[BuildResult]:
    """Build cohorts in the site's results schema, all in one transaction.

    Parameters
    ----------
    engine:
        The site's database.
    requests:
        ``(definition, cohort_id)`` pairs.
    replace:
        Rebuild ids that already exist; otherwise an existing id is an error.

    Raises
    ------
    DataError
        Bad definition, unknown entry concepts, duplicate or existing ids.
    DatabaseError
        A statement failed; nothing was changed.
    """
    import time

    ids = [cohort_id for _, cohort_id in requests]
    if len(set(ids)) != len(ids):
        raise DataError("cohort build: the same cohort id is requested twice; give each definition its own --id")
    dialect = engine.dialect.name
    where = f"site {site.name}"
    try:
        setup = engine.connect()
    except sa.exc.DBAPIError as exc:
        raise DatabaseError(f"cannot connect to {where}: {describe_driver_error(exc)}") from None
    try:
        with setup.begin():  # results tables are created once, outside the build transaction
            create_results(setup, site.results_schema)
    except sa.exc.DBAPIError as exc:
        reason = describe_driver_error(exc)
        hint = ("; grant CREATE on the database or create the schema for omopfl"
                if reason.startswith("permission denied") else "")
        raise DatabaseError(f"{where}: cannot create results schema {site.results_schema} ({reason}){hint}") \
            from None
    finally:
        setup.close()

    try:
        conn = engine.connect().execution_options(no_parameters=True)
    except sa.exc.DBAPIError as exc:
        raise DatabaseError(f"cannot connect to {where}: {describe_driver_error(exc)}") from None
    results: list[BuildResult] = []
    try:
        existing = _existing_ids(conn, site.results_schema, ids)
        conn.rollback()
        if existing and not replace:
            cohort_id, name = next(iter(sorted(existing.items())))
            raise DataError(
                f"{where}: cohort id {cohort_id} already exists ({name}); pass --replace to rebuild it "
                "or choose another --id"
            )
        plans = []
        for definition, cohort_id in requests:
            warnings = _concept_warnings(conn, site, definition)
            statements = render_sql(
                definition, dialect, site.cdm_schema, site.vocabulary_schema, site.results_schema, cohort_id,
                translator,
            )
            plans.append((definition, cohort_id, statements, warnings))
        conn.rollback()
        total = sum(len(p[2]) for p in plans)
        with _progress(progress, total, f"building {len(plans)} cohort(s) at {site.name}") as advance:
            transaction = conn.begin()
            try:
                if dialect == "postgresql":
                    # CIRCE SQL joins many small temp tables; nested loops can turn a 0.1 s cohort into
                    # minutes on PostgreSQL's default plans.  LOCAL: only for this transaction.
                    conn.exec_driver_sql("SET LOCAL enable_nestloop = off")
                    # With nested loops off, cost estimates of the small attrition inserts explode past
                    # jit_above_cost and PostgreSQL spends ~0.4 s per statement compiling (bench/cohort_bench.py).
                    conn.exec_driver_sql("SET LOCAL jit = off")
                    conn.exec_driver_sql(f"SET LOCAL statement_timeout = {int(STATEMENT_TIMEOUT_MS)}")
                for definition, cohort_id, statements, warnings in plans:
                    started = time.perf_counter()
                    _write_rule_names(conn, site.results_schema, definition, cohort_id)
                    for index, statement in enumerate(statements, start=1):
                        try:
                            conn.exec_driver_sql(statement)
                        except sa.exc.DBAPIError as exc:
                            raise DatabaseError(
                                f"{where}: cohort {cohort_id} ({definition.name}) failed at statement "
                                f"{index}/{len(statements)} ({describe_driver_error(exc)}); "
                                "nothing was changed"
                            ) from None
                        advance()
                    persons, records = _cohort_counts(conn, site.results_schema, cohort_id)
                    _write_definition_row(conn, site.results_schema, definition, cohort_id, translator,
                                          persons, records)
                    results.append(BuildResult(
                        cohort_id, definition.name, definition.hash, translator, persons, records,
                        len(statements), round(time.perf_counter() - started, 3), warnings,
                    ))
                transaction.commit()
            except BaseException:
                transaction.rollback()
                raise
        if dialect == "postgresql":
            _analyze_cohort_table(conn, site.results_schema)
    except sa.exc.DBAPIError as exc:
        raise DatabaseError(f"{where}: cohort build failed ({describe_driver_error(exc)}); nothing was changed") \
            from None
    finally:
        conn.close()
    return results


def _analyze_cohort_table(conn: sa.Connection, results_schema: str) -> None:
    """Refresh PostgreSQL's statistics of the cohort table after a build.

    Without it, a cohort id the planner has never seen is estimated at one row and queries over the
    cohort (the feature query) get nested-loop plans ~20x slower (bench/prepare_bench.py).  Best
    effort: a role that does not own the table may not ANALYZE it.
    """
    try:
        with conn.begin():
            conn.exec_driver_sql(sql_text("analyze_table", table=qualified(results_schema, "cohort")))
    except sa.exc.DBAPIError:
        pass


class _progress:
    """A rich progress bar when asked for, a no-op otherwise."""

    def __init__(self, enabled: bool, total: int, description: str) -> None:
        self.enabled, self.total, self.description = enabled, total, description
        self._bar = None

    def __enter__(self):
        if not self.enabled:
            return lambda: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn(), transient=False)
        self._bar.start()
        task = self._bar.add_task(self.description, total=self.total)
        return lambda: self._bar.advance(task)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()


def _write_rule_names(conn: sa.Connection, results: str, definition: CohortDefinition, cohort_id: int) -> None:
    table = qualified(results, "cohort_inclusion")
    conn.execute(sa.text(sql_text("cohort_inclusion_delete", cohort_inclusion=table)), {"id": cohort_id})
    for sequence, (name, description) in enumerate(definition.inclusion_rules):
        conn.execute(
            sa.text(sql_text("cohort_inclusion_insert", cohort_inclusion=table)),
            {"id": cohort_id, "seq": sequence, "name": name[:255], "description": description},
        )


def _cohort_counts(conn: sa.Connection, results: str, cohort_id: int) -> tuple[int, int]:
    row = conn.execute(
        sa.text(sql_text("cohort_counts", cohort=qualified(results, "cohort"))),
        {"id": cohort_id},
    ).one()
    return int(row[0]), int(row[1])


def _write_definition_row(
    conn: sa.Connection, results: str, definition: CohortDefinition, cohort_id: int, translator: str,
    persons: int, records: int,
) -> None:
    table = qualified(results, "cohort_definition")
    conn.execute(sa.text(sql_text("cohort_definition_delete", cohort_definition=table)), {"id": cohort_id})
    conn.execute(
        sa.text(sql_text("cohort_definition_insert", cohort_definition=table)),
        {"id": cohort_id, "name": definition.name[:255], "hash": definition.hash, "translator": translator,
         "built_at": datetime.now(UTC).replace(tzinfo=None, microsecond=0), "persons": persons,
         "records": records},
    )


# --------------------------------------------------------------------------- list / show
@dataclass
class CohortSummary:
    """One row of `omopfl cohort list` (counts masked below min_cell_count)."""

    cohort_id: int
    name: str
    persons: int | str
    records: int | str
    built_at: str
    translator: str
    definition_hash: str


@dataclass
class RuleAttrition:
    """One inclusion rule (OHDSI ``cohort_inclusion_stats``).

    ``persons_passing`` meet the rule; ``failing_only_this`` fail this rule but pass every other one
    (what removing the rule would gain); ``total`` is the number of persons the rules were applied to.
    """

    sequence: int
    name: str
    persons_passing: int | str
    failing_only_this: int | str
    total: int | str


@dataclass
class CohortDetail:
    """`omopfl cohort show`: counts and inclusion-rule attrition (masked below min_cell_count)."""

    summary: CohortSummary
    base_count: int | str | None
    final_count: int | str | None
    censored: int | str | None
    rules: list[RuleAttrition]
    mode: str = "best event per person"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ensure_results(conn: sa.Connection, site: SiteConfig) -> None:
    from omopfl.db import existing_tables

    if "cohort_definition" not in existing_tables(conn, site.results_schema):
        raise DataError(
            f"site {site.name}: no cohorts built yet in results schema {site.results_schema}; "
            "run omopfl cohort build first"
        )


def list_cohorts(conn: sa.Connection, site: SiteConfig) -> list[CohortSummary]:
    """Cohorts built at a site, with masked counts."""
    _ensure_results(conn, site)
    rows = conn.execute(sa.text(
        sql_text("cohort_definition_list", cohort_definition=qualified(site.results_schema, "cohort_definition"))
    )).all()
    k = site.min_cell_count
    return [CohortSummary(int(r[0]), r[1], mask_count(r[2], k), mask_count(r[3], k), str(r[4]), r[5], r[6][:12])
            for r in rows]


def show_cohort(conn: sa.Connection, site: SiteConfig, cohort_id: int) -> CohortDetail:
    """Counts and inclusion-rule attrition of one cohort, masked below the site's min_cell_count."""
    _ensure_results(conn, site)
    found = [c for c in list_cohorts(conn, site) if c.cohort_id == cohort_id]
    if not found:
        raise DataError(f"site {site.name}: no cohort with id {cohort_id}; see omopfl cohort list")
    k = site.min_cell_count
    results = site.results_schema
    mode = 1  # best event per person, as ATLAS shows by default
    summary = conn.execute(
        sa.text(sql_text("cohort_summary_stats", cohort_summary_stats=qualified(results, "cohort_summary_stats"))),
        {"id": cohort_id, "mode": mode},
    ).first()
    censored = conn.execute(
        sa.text(sql_text("cohort_censor_stats", cohort_censor_stats=qualified(results, "cohort_censor_stats"))),
        {"id": cohort_id},
    ).scalar()
    names = dict(conn.execute(
        sa.text(sql_text("cohort_inclusion_names", cohort_inclusion=qualified(results, "cohort_inclusion"))),
        {"id": cohort_id},
    ).all())
    stats = conn.execute(
        sa.text(sql_text("cohort_inclusion_stats",
                         cohort_inclusion_stats=qualified(results, "cohort_inclusion_stats"))),
        {"id": cohort_id, "mode": mode},
    ).all()
    rules = [RuleAttrition(int(r[0]), str(names.get(r[0], f"rule {r[0]}")), mask_count(r[1], k),
                           mask_count(r[2], k), mask_count(r[3], k)) for r in stats]
    return CohortDetail(
        summary=found[0],
        # CIRCE writes summary statistics only for cohorts with inclusion rules.
        base_count=mask_count(summary[0], k) if summary else None,
        final_count=mask_count(summary[1], k) if summary else found[0].persons,
        censored=mask_count(censored, k) if censored is not None else None,
        rules=rules,
    )


def assign_ids(definitions: Iterable[CohortDefinition], first_id: int | None) -> list[tuple[CohortDefinition, int]]:
    """Pair definitions with cohort ids: ``first_id``, ``first_id + 1``, ... or each file's own id."""
    pairs = []
    for offset, definition in enumerate(definitions):
        if first_id is not None:
            pairs.append((definition, first_id + offset))
        elif definition.default_id is not None:
            pairs.append((definition, definition.default_id))
        else:
            raise DataError(
                f"{definition.source}: no cohort id (the file has no 'id' and its name is not a number); pass --id N"
            )
    return pairs
