"""Site adapters: one TOML file per site, parsed once into typed configuration.

A site is configuration, not code.  The database URL is never written in the
file: the file names the environment variable that holds it.

Example ``adapters/site_a.toml``::

    [site]
    name = "site_a"
    min_cell_count = 10

    [database]
    url_env = "OMOPFL_SITE_A_URL"     # or: duckdb_path = "site_a.duckdb" (embedded)
    cdm_schema = "cdm"
    vocabulary_schema = "cdm"
    results_schema = "results"

    [files]
    image_root = "data/site_a/images"
    omics_root = "data/site_a/omics"
"""

from __future__ import annotations

import contextlib
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omopfl.errors import ConfigError
from omopfl.policy import SitePolicy, parse_policy

__all__ = ["SiteConfig", "load_site", "IDENTIFIER_RE", "check_identifier"]

IDENTIFIER_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# A plain name: it becomes a folder (data/prepared/<site>), so no '.', '..', separators or leading dot.
SITE_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
MAX_MIN_CELL_COUNT = 1_000_000
ENV_NAME_RE = re.compile(r"^[A-Z_][A-Z0-9_]*$")
DEFAULT_MIN_CELL_COUNT = 10


def check_identifier(value: str, what: str) -> str:
    """Return ``value`` if it is a plain SQL identifier, else raise ConfigError.

    The value itself is not echoed when it is rejected: it may hold SQL.
    """
    if not isinstance(value, str) or not IDENTIFIER_RE.match(value):
        raise ConfigError(
            f"{what} is not a plain identifier: use letters, digits and underscores only, "
            "starting with a letter or underscore"
        )
    return value


@dataclass(frozen=True)
class SiteConfig:
    """Typed configuration of one site, read from its adapter TOML."""

    name: str
    url_env: str | None
    cdm_schema: str
    vocabulary_schema: str
    results_schema: str
    min_cell_count: int = DEFAULT_MIN_CELL_COUNT
    image_root: Path | None = None
    omics_root: Path | None = None
    duckdb_path: Path | None = None
    source: Path | None = field(default=None, compare=False)
    policy: SitePolicy = field(default_factory=SitePolicy)

    def database_url(self) -> str:
        """Return the database URL: an embedded DuckDB file, or the URL in the env var the adapter names."""
        if self.duckdb_path is not None:
            return f"duckdb:///{self.duckdb_path}"
        assert self.url_env is not None
        url = os.environ.get(self.url_env, "").strip()
        if not url:
            where = f"{self.source}: " if self.source else ""
            raise ConfigError(
                f"{where}environment variable {self.url_env} (database.url_env) is not set: "
                f"export {self.url_env}=<SQLAlchemy URL of site {self.name}'s CDM database>"
            )
        return url


def _get(table: dict[str, Any], key: str, kind: type, path: Path, section: str, default: Any = ...) -> Any:
    if key not in table:
        if default is ...:
            raise ConfigError(f"{path}: missing key [{section}] {key}")
        return default
    value = table[key]
    if kind is int and isinstance(value, bool):
        raise ConfigError(f"{path}: [{section}] {key} must be an integer")
    if not isinstance(value, kind):
        kinds = {int: "an integer", str: "a string", bool: "true or false", float: "a number"}
        raise ConfigError(f"{path}: [{section}] {key} must be {kinds.get(kind, kind.__name__)}")
    if isinstance(value, str) and ("\x00" in value or not value.strip()):
        raise ConfigError(f"{path}: [{section}] {key} must be a non-empty string without NUL characters")
    return value


def _section(data: dict[str, Any], name: str, path: Path, required: bool = True) -> dict[str, Any]:
    value = data.get(name)
    if value is None:
        if required:
            raise ConfigError(f"{path}: missing section [{name}]")
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: [{name}] must be a table")
    return value


def _resolve(root: str | None, base: Path) -> Path | None:
    if root is None:
        return None
    candidate = Path(os.path.expandvars(root))
    with contextlib.suppress(RuntimeError):  # ~user of an unknown user: kept as written
        candidate = candidate.expanduser()
    return candidate if candidate.is_absolute() else (base / candidate)


def load_site(path: str | Path) -> SiteConfig:
    """Parse a site adapter TOML file.

    Errors name the file and the key, never a secret.
    Relative paths (DuckDB file, file roots) resolve against the adapter file's folder.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: site adapter file not found")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except (OSError, RecursionError) as exc:
        raise ConfigError(f"{path}: cannot read the site adapter ({type(exc).__name__})") from None

    site = _section(data, "site", path)
    database = _section(data, "database", path)
    files = _section(data, "files", path, required=False)

    name = _get(site, "name", str, path, "site")
    if not SITE_NAME_RE.match(name) or ".." in name:
        raise ConfigError(f"{path}: [site] name must be a plain name: 1-64 letters, digits, '_', '-' or '.', "
                          "starting with a letter, digit or '_' (it names the site's dataset folder)")
    min_cell_count = _get(site, "min_cell_count", int, path, "site", DEFAULT_MIN_CELL_COUNT)
    if not 1 <= min_cell_count <= MAX_MIN_CELL_COUNT:
        raise ConfigError(f"{path}: [site] min_cell_count must be between 1 and {MAX_MIN_CELL_COUNT:,}")

    if "url" in database:
        raise ConfigError(
            f"{path}: [database] url must not be written in the adapter; "
            "set url_env to the name of an environment variable holding it"
        )
    url_env = _get(database, "url_env", str, path, "database", None)
    duckdb_path = _resolve(_get(database, "duckdb_path", str, path, "database", None), path.parent)
    if (url_env is None) == (duckdb_path is None):
        raise ConfigError(
            f"{path}: [database] needs exactly one of url_env (name of an environment variable holding the URL) "
            "or duckdb_path (an embedded DuckDB file)"
        )
    if url_env is not None and not ENV_NAME_RE.match(url_env):
        raise ConfigError(f"{path}: [database] url_env must be an environment variable name (A-Z, 0-9, _)")
    cdm_schema = check_identifier(
        _get(database, "cdm_schema", str, path, "database"), f"{path}: [database] cdm_schema"
    )
    vocabulary_schema = check_identifier(
        _get(database, "vocabulary_schema", str, path, "database", cdm_schema),
        f"{path}: [database] vocabulary_schema",
    )
    results_schema = check_identifier(
        _get(database, "results_schema", str, path, "database"), f"{path}: [database] results_schema"
    )
    if duckdb_path is not None and duckdb_path.stem.lower() in {
        cdm_schema.lower(), vocabulary_schema.lower(), results_schema.lower()
    }:
        raise ConfigError(
            f"{path}: [database] duckdb_path file name {duckdb_path.name} equals a schema name; DuckDB would "
            "confuse the catalog with the schema: rename the file (e.g. omop.duckdb)"
        )
    # DuckDB compares identifiers case-insensitively, and omopfl looks schemas up that way on both backends.
    if results_schema.lower() == cdm_schema.lower():
        raise ConfigError(f"{path}: [database] results_schema must differ from cdm_schema, also in letter case "
                          "(the CDM is read-only; DuckDB takes CDM and cdm for the same schema)")
    if results_schema.lower() == vocabulary_schema.lower():
        raise ConfigError(f"{path}: [database] results_schema must differ from vocabulary_schema, also in letter "
                          "case (the vocabulary is read-only)")

    base = path.parent
    image_root = _resolve(_get(files, "image_root", str, path, "files", None), base)
    omics_root = _resolve(_get(files, "omics_root", str, path, "files", None), base)
    known = {"site": {"name", "min_cell_count"},
             "database": {"url_env", "duckdb_path", "cdm_schema", "vocabulary_schema", "results_schema"},
             "files": {"image_root", "omics_root"}}
    for section in data:
        if section not in known and section != "policy":  # [policy]: parsed by omopfl.policy
            expected = ", ".join(f"[{k}]" for k in (*known, "policy"))
            raise ConfigError(f"{path}: unknown section [{section[:40]}]; expected {expected}")
    policy = parse_policy(data.get("policy"), path, name)
    for section, keys in known.items():
        for key in _section(data, section, path, required=False):
            if key not in keys:
                raise ConfigError(f"{path}: unknown key [{section}] {key[:40]}; expected one of {sorted(keys)}")

    return SiteConfig(
        name=name,
        url_env=url_env,
        cdm_schema=cdm_schema,
        vocabulary_schema=vocabulary_schema,
        results_schema=results_schema,
        min_cell_count=min_cell_count,
        duckdb_path=duckdb_path,
        image_root=image_root,
        omics_root=omics_root,
        source=path,
        policy=policy,
    )
