"""Site adapter parsing: typed config, errors that name the file and key, no secrets in files."""

from __future__ import annotations

from pathlib import Path

import pytest

from omopfl.config import load_site
from omopfl.errors import ConfigError

GOOD = """
[site]
name = "site_a"
min_cell_count = 5

[database]
url_env = "OMOPFL_SITE_A_URL"
cdm_schema = "cdm"
results_schema = "results"

[files]
image_root = "images"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "site.toml"
    path.write_text(text)
    return path


def test_parses_typed_config_and_defaults(tmp_path: Path) -> None:
    site = load_site(write(tmp_path, GOOD))
    assert site.name == "site_a"
    assert site.min_cell_count == 5
    assert site.vocabulary_schema == "cdm"  # defaults to the CDM schema
    assert site.image_root == tmp_path / "images"  # relative to the adapter's folder
    assert site.omics_root is None


def test_min_cell_count_defaults_to_10(tmp_path: Path) -> None:
    site = load_site(write(tmp_path, GOOD.replace("min_cell_count = 5\n", "")))
    assert site.min_cell_count == 10


def test_database_url_comes_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = load_site(write(tmp_path, GOOD))
    monkeypatch.delenv("OMOPFL_SITE_A_URL", raising=False)
    with pytest.raises(ConfigError, match="OMOPFL_SITE_A_URL"):
        site.database_url()
    monkeypatch.setenv("OMOPFL_SITE_A_URL", "duckdb:///x.duckdb")
    assert site.database_url() == "duckdb:///x.duckdb"


def test_duckdb_path_is_relative_to_adapter(tmp_path: Path) -> None:
    text = GOOD.replace('url_env = "OMOPFL_SITE_A_URL"', 'duckdb_path = "db/site.duckdb"')
    site = load_site(write(tmp_path, text))
    assert site.database_url() == f"duckdb:///{tmp_path / 'db' / 'site.duckdb'}"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("[site]\nname", "[nosite]\nname"), r"missing section \[site\]"),
        (('cdm_schema = "cdm"', ""), r"missing key \[database\] cdm_schema"),
        (('cdm_schema = "cdm"', 'cdm_schema = "cdm; DROP TABLE person"'), r"cdm_schema is not a plain identifier"),
        (('results_schema = "results"', 'results_schema = "cdm"'), "must differ"),
        (("min_cell_count = 5", "min_cell_count = 0"), "min_cell_count must be between 1 and"),
        (("min_cell_count = 5", 'min_cell_count = "5"'), "min_cell_count must be an integer"),
        (('url_env = "OMOPFL_SITE_A_URL"', 'url = "postgresql://u:pw@h/db"'), "must not be written in the adapter"),
        (('url_env = "OMOPFL_SITE_A_URL"', 'url_env = "lower-case"'), "url_env must be an environment variable"),
        (("[files]", "[files]\nimage_rot = 'x'"), r"unknown key \[files\] image_rot"),
        (("[site]", "[site"), "not valid TOML"),
    ],
)
def test_errors_name_file_and_key(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    path = write(tmp_path, GOOD.replace(*change))
    with pytest.raises(ConfigError, match=message) as info:
        load_site(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)
    assert "pw@" not in str(info.value)  # a secret written by mistake is never echoed


def test_injected_schema_name_is_not_echoed(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace('cdm_schema = "cdm"', 'cdm_schema = "x\\"; DROP TABLE person; --"'))
    with pytest.raises(ConfigError) as info:
        load_site(path)
    assert "DROP" not in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_site(tmp_path / "absent.toml")


def test_duckdb_file_named_like_a_schema_is_refused(tmp_path: Path) -> None:
    text = GOOD.replace('url_env = "OMOPFL_SITE_A_URL"', 'duckdb_path = "cdm.duckdb"')
    with pytest.raises(ConfigError, match=r"duckdb_path file name cdm.duckdb equals a schema name"):
        load_site(write(tmp_path, text))
