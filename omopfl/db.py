"""Database access: engines for PostgreSQL and DuckDB, identifier quoting, CDM version detection.

Every stage takes an open :class:`sqlalchemy.Connection`; this module is where
URLs become connections and where driver errors become :class:`DatabaseError`
with a message that is safe to show (no driver text, which can echo values).
It knows nothing of the CDM's tables: inspecting a site's CDM and writing rows into
CDM tables are in :mod:`omopfl.cdm`, which builds on this module (never the reverse).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import sqlalchemy as sa

from omopfl.config import SiteConfig, check_identifier
from omopfl.errors import CdmError, ConfigError, DatabaseError

__all__ = [
    "make_engine",
    "sql_row_condition",
    "site_engine",
    "connect",
    "quote_identifier",
    "qualified",
    "schema_exists",
    "existing_tables",
    "detect_cdm_version",
    "describe_driver_error",
    "is_driver_error",
    "map_driver_error",
    "sql_text",
]

_PACKAGE = Path(__file__).resolve().parent
# The static queries: the checkout's top-level sql/, which the wheel carries as omopfl/bundled/sql.
SQL_DIR = _PACKAGE / "bundled" / "sql" if (_PACKAGE / "bundled" / "sql").is_dir() else _PACKAGE.parent / "sql"


@cache
def _sql_file(name: str) -> str:
    """The query of ``sql/<name>.sql`` without its ``--`` comment lines (read once)."""
    if not re.fullmatch(r"[a-z0-9_]+", name):
        raise ValueError(f"bad query name {name!r}")
    text = (SQL_DIR / f"{name}.sql").read_text(encoding="utf-8")
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("--")).strip()


def sql_text(name: str, **identifiers: str) -> str:
    """The static query ``sql/<name>.sql``, its ``{placeholders}`` filled with ``identifiers``.

    Values are named binds (``:schema``) passed when the query runs; placeholders hold only
    identifiers the caller has checked and quoted (:func:`qualified`) or column names from omopfl's
    own CDM catalogue, because a table name cannot be bound.
    """
    text = _sql_file(name)
    return text.format(**identifiers) if identifiers else text


_ROW_COUNT = re.compile(r"SELECT count\(\*\) FROM (\S+) WHERE (.+)", re.S | re.I)


def sql_row_condition(name: str, **identifiers: str) -> str:
    """The row condition of a row-count check ``sql/<name>.sql`` (a file ``SELECT count(*) FROM <table>
    WHERE <condition>``), in parentheses, its placeholders filled.

    So a scan that counts several conditions of one table at once (``sum(CASE WHEN <condition> ...)``)
    uses the check's one definition instead of a copy; a file of any other form is a ValueError.
    """
    match = _ROW_COUNT.fullmatch(" ".join(sql_text(name, **identifiers).split()))
    if match is None:
        raise ValueError(f"sql/{name}.sql is not a row-count check (SELECT count(*) FROM <table> WHERE ...)")
    return f"({match.group(2)})"


def quote_identifier(name: str) -> str:
    """Quote an identifier after checking it against the allow-list pattern."""
    check_identifier(name, "identifier")
    return f'"{name}"'


def qualified(schema: str, table: str) -> str:
    """Return ``"schema"."table"`` with both parts checked and quoted."""
    return f"{quote_identifier(schema)}.{quote_identifier(table)}"


_NAME = r'"?([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)?)"?'
# (pattern in the lower-cased driver text, reason) -- the first match wins.  A reason may name a
# table, column, schema or role (``{0}``: an identifier captured by the pattern, checked against the
# identifier allow-list), never a value.
_DRIVER_REASONS: tuple[tuple[str, str], ...] = (
    (
        r"password authentication failed|password authentication|no password supplied|"
        r"authentication failed",
        "authentication failed: check the user name and password in the URL",
    ),
    (r"role " + _NAME + r" does not exist", "authentication failed: role {0} does not exist"),
    (r"database " + _NAME + r" does not exist", "database {0} does not exist: check the URL"),
    (r"connection refused", "connection refused: is the database server running on that host and port?"),
    (
        r"could not translate host name|name or service not known|nodename nor servname",
        "unknown host: check the host name in the URL",
    ),
    (
        r"canceling statement due to statement timeout",
        "a statement ran longer than the statement timeout (OMOPFL_STATEMENT_TIMEOUT_MS)",
    ),
    (r"canceling statement due to user request|query interrupted", "the statement was cancelled"),
    (r"timeout expired|timed out|timeout", "connection timed out: check the host, port and firewall"),
    (
        r"terminating connection|server closed the connection|connection already closed|"
        r"ssl syscall error|connection not open|could not receive data from server|"
        r"the database system is shutting down",
        "the database server closed the connection (database dropped or server restarted); run the command again",
    ),
    (
        r"could not set lock|conflicting lock|lock on file",
        "the DuckDB file is locked by another process: wait for it to finish or close it, then run again",
    ),
    (
        r"permission denied to create temporary tables",
        "permission denied to create temporary tables: grant TEMP on the database to this role",
    ),
    (
        r"permission denied for schema " + _NAME,
        "permission denied on schema {0}: grant USAGE (and CREATE for the results schema) to this role",
    ),
    (r"permission denied for (?:table|relation) " + _NAME, "permission denied on table {0}: grant SELECT to this role"),
    (r"permission denied", "permission denied: check the role's grants"),
    (r"relation " + _NAME + r" does not exist", "table {0} does not exist"),
    (r"table with name " + _NAME + r" does not exist", "table {0} does not exist"),
    (r"column " + _NAME + r" does not exist", "column {0} does not exist"),
    (r"referenced column " + _NAME + r" not found", "column {0} does not exist"),
    (r"schema " + _NAME + r" does not exist", "schema {0} does not exist"),
    (r"does not exist", "object does not exist"),
    (r"value out of range|numeric field overflow|out of range", "a value is out of range for its type"),
    (
        r"could not convert|conversion error|invalid input syntax",
        "a value does not have the type its column should have (check the column types of the CDM tables)",
    ),
    (r"io error|cannot open file|could not open file|unable to open", "cannot open the database file"),
    (r"syntax error", "SQL syntax error"),
    (r"duplicate key", "duplicate key"),
    (r"disk full|no space left", "no space left on the database server's disk"),
)
_DRIVER_PATTERNS = tuple((re.compile(p), reason) for p, reason in _DRIVER_REASONS)


def describe_driver_error(exc: BaseException) -> str:
    """Classify a driver error into a short reason that never echoes driver text.

    The reason may name a role, database, schema, table or column taken from the driver's message
    (only when it is a plain identifier), never a value.
    """
    text = " ".join(str(getattr(exc, "orig", exc)).lower().split())
    for pattern, reason in _DRIVER_PATTERNS:
        match = pattern.search(text)
        if match:
            names = [g for g in match.groups() if g and re.fullmatch(r"[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)?", g)]
            if "{0}" in reason:
                return reason.format(names[0]) if names else reason.replace(" {0}", "")
            return reason
    return type(getattr(exc, "orig", exc)).__name__


def is_driver_error(exc: BaseException) -> bool:
    """True for errors raised by SQLAlchemy or a database driver (psycopg, duckdb)."""
    module = type(exc).__module__.split(".")[0]
    return isinstance(exc, sa.exc.SQLAlchemyError) or module in {"psycopg2", "psycopg", "duckdb", "_duckdb"}


def map_driver_error(exc: BaseException, what: str | None = None) -> DatabaseError:
    """A driver error as one-line :class:`DatabaseError`: where (the engine's ``what``) and why."""
    where = what or getattr(exc, "omopfl_what", None) or "database"
    return DatabaseError(f"{where}: {describe_driver_error(exc)}")


def make_engine(url: str, *, what: str = "database") -> sa.Engine:
    """Create an engine for a PostgreSQL or DuckDB URL.

    ``postgresql://`` is taken as psycopg2 (the product's named driver) unless a
    driver is given explicitly.  DuckDB files are created on first use.
    """
    try:
        parsed = sa.engine.make_url(url)
    except Exception:
        raise ConfigError(f"{what}: URL is not a valid SQLAlchemy URL (e.g. postgresql://user@host/db)") from None
    backend = parsed.get_backend_name()
    if backend == "postgresql":
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg2")
        engine = sa.create_engine(parsed, pool_pre_ping=True, connect_args={"connect_timeout": 10})
    elif backend == "duckdb":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(parsed)
    else:
        raise ConfigError(f"{what}: unsupported database '{backend}'; use postgresql:// or duckdb:///")

    @sa.event.listens_for(engine, "handle_error")
    def _name_the_database(context: sa.engine.ExceptionContext) -> None:
        # Errors that escape every stage still say which database they came from (map_driver_error).
        if context.sqlalchemy_exception is not None:
            context.sqlalchemy_exception.omopfl_what = what  # type: ignore[attr-defined]

    return engine


def site_engine(site: SiteConfig) -> sa.Engine:
    """Engine for a site's database (URL from the environment variable its adapter names).

    A ``duckdb_path`` must name an existing file: connecting would otherwise create an empty database.
    """
    source = site.url_env or "duckdb_path"
    if site.duckdb_path is not None and not site.duckdb_path.is_file():
        where = f"{site.source}: " if site.source else ""
        problem = (
            "is in a folder that does not exist"
            if not site.duckdb_path.parent.is_dir()
            else "names a file that does not exist"
        )
        raise ConfigError(
            f"{where}[database] duckdb_path {problem}; check the path (relative to the adapter file) "
            "or run omopfl synth / omopfl eunomia to create the database"
        )
    return make_engine(site.database_url(), what=f"site {site.name} ({source})")


@contextmanager
def connect(engine: sa.Engine, *, what: str = "database") -> Iterator[sa.Connection]:
    """Open a connection, mapping driver errors to one-line DatabaseError."""
    try:
        conn = engine.connect()
    except sa.exc.DBAPIError as exc:
        raise DatabaseError(f"cannot connect to {what}: {describe_driver_error(exc)}") from None
    try:
        yield conn
    except sa.exc.DBAPIError as exc:
        raise DatabaseError(f"{what}: statement failed ({describe_driver_error(exc)})") from None
    finally:
        conn.close()


def schema_exists(conn: sa.Connection, schema: str) -> bool:
    check_identifier(schema, "schema")
    row = conn.execute(
        sa.text(sql_text("schema_exists")),
        {"schema": schema},
    ).scalar_one()
    return bool(row)


def existing_tables(conn: sa.Connection, schema: str) -> set[str]:
    """Lower-cased names of the tables and views in a schema."""
    check_identifier(schema, "schema")
    rows = conn.execute(
        sa.text(sql_text("schema_tables")),
        {"schema": schema},
    ).scalars()
    return {r.lower() for r in rows}


def table_columns_in_db(conn: sa.Connection, schema: str, table: str) -> set[str]:
    rows = conn.execute(
        sa.text(sql_text("table_columns")),
        {"schema": schema, "table": table},
    ).scalars()
    return {r.lower() for r in rows}


def detect_cdm_version(conn: sa.Connection, cdm_schema: str) -> str:
    """Return "5.4" or "5.3" for the CDM in ``cdm_schema``.

    Reads ``cdm_source.cdm_version`` when it is filled in, and falls back on the
    columns that differ between versions (``visit_occurrence.admitted_from_concept_id``
    in 5.4, ``admitting_source_concept_id`` in 5.3).
    """
    tables = existing_tables(conn, cdm_schema)
    if "cdm_source" in tables:
        try:
            value = conn.execute(
                sa.text(sql_text("cdm_source_version", cdm_source=qualified(cdm_schema, "cdm_source")))
            ).scalar()
        except sa.exc.DBAPIError:
            conn.rollback()
            value = None
        if value:
            text = str(value).strip().lower().lstrip("v")
            if text.startswith("5.4"):
                return "5.4"
            if text.startswith("5.3"):
                return "5.3"
    if "visit_occurrence" in tables:
        columns = table_columns_in_db(conn, cdm_schema, "visit_occurrence")
        if "admitted_from_concept_id" in columns:
            return "5.4"
        if "admitting_source_concept_id" in columns:
            return "5.3"
    raise CdmError(f"schema {cdm_schema}: cannot tell the CDM version (no cdm_source.cdm_version, no visit_occurrence)")
