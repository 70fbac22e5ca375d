"""`omopfl sites check` and `validate` count every shared CDM defect the same (issue 15: checks written once).

A hand-built CDM with each defect planted a known number of times, on DuckDB and PostgreSQL.  Both
commands read the same ``sql/cdm_*.sql`` file for each check, so their numbers must agree, and agree with
the definitions chosen for issue 15: duplicate keys count distinct values (not rows); rows with a NULL
date or person_id are defects; concept id 0 or NULL is unmapped; death before birth counts persons.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa

from omopfl.cdm import bulk_insert, create_cdm
from omopfl.config import load_site
from omopfl.db import qualified
from omopfl.sites import check_site
from omopfl.validation import cdm_conformance


def _dates(*values: str | None) -> pd.Series:
    return pd.Series(pd.to_datetime(list(values)))


def _ints(*values: int | None) -> pd.Series:
    return pd.Series(pd.array(list(values), dtype="Int64"))


def defect_cdm(engine: sa.Engine, schema: str = "cdm") -> None:
    """Planted: see EXPECTED.  NOT NULL is dropped where a NULL defect is planted."""
    with engine.begin() as conn:
        create_cdm(conn, schema, primary_keys=False)
        for table, column in (("observation_period", "person_id"), ("condition_occurrence", "person_id"),
                              ("condition_occurrence", "condition_concept_id"),
                              ("condition_occurrence", "condition_start_date")):
            conn.execute(sa.text(f"ALTER TABLE {qualified(schema, table)} ALTER COLUMN {column} DROP NOT NULL"))
        # person 3 is on two rows (born 1970 and 1990); person 4 has no observation period
        bulk_insert(conn, schema, "person", pd.DataFrame({
            "person_id": [1, 2, 3, 3, 4], "gender_concept_id": [8507, 8532, 8532, 8532, 8507],
            "year_of_birth": [1950, 1960, 1970, 1990, 1980], "race_concept_id": [0] * 5,
            "ethnicity_concept_id": [0] * 5,
        }))
        # id 4 on three rows and id 6 on two (2 duplicate values, 5 rows); person 99 absent, one NULL
        # person_id; one period ending before it starts
        bulk_insert(conn, schema, "observation_period", pd.DataFrame({
            "observation_period_id": [1, 2, 3, 4, 4, 4, 6, 6],
            "person_id": _ints(1, 2, 3, 99, None, 1, 2, 1),
            "observation_period_start_date": _dates("2010-01-01", "2011-01-01", "2000-01-01", "2012-01-01",
                                                   "2012-01-01", "2022-02-01", "2019-01-01", "2021-01-01"),
            "observation_period_end_date": _dates("2020-01-01", "2021-01-01", "2022-01-01", "2013-01-01",
                                                 "2013-01-01", "2022-03-01", "2018-01-01", "2021-06-01"),
            "period_type_concept_id": [32817] * 8,
        }))
        # outside: one before every period, one without a person, one without a date; unmapped: 0 and NULL;
        # id 2 twice
        bulk_insert(conn, schema, "condition_occurrence", pd.DataFrame({
            "condition_occurrence_id": [1, 2, 2, 3, 4],
            "person_id": _ints(1, 1, 2, None, 2),
            "condition_concept_id": _ints(201826, 0, None, 320128, 320128),
            "condition_start_date": _dates("2015-01-01", "2005-01-01", "2015-06-01", "2015-06-01", None),
            "condition_type_concept_id": [32817] * 5,
        }))
        # two numeric values without a unit (0 and NULL); a unit-less row without a value is fine
        bulk_insert(conn, schema, "measurement", pd.DataFrame({
            "measurement_id": [1, 2, 3, 4], "person_id": [1, 1, 1, 2],
            "measurement_concept_id": [3004410] * 4,
            "measurement_date": _dates("2015-01-01", "2015-01-01", "2015-02-01", "2015-01-01"),
            "measurement_type_concept_id": [32817] * 4,
            "value_as_number": [7.0, 6.0, None, 5.0], "unit_concept_id": _ints(0, None, 0, 8554),
        }))
        # persons 1 (born 1950) and 3 (a row born 1990; two deaths) die before birth: 2 persons, 3 rows
        bulk_insert(conn, schema, "death", pd.DataFrame({
            "person_id": [1, 3, 3, 2],
            "death_date": _dates("1940-01-01", "1980-05-01", "1975-01-01", "2030-01-01"),
        }))


# sites check (check, table) -> (validate (check, table, field), planted count)
EXPECTED: dict[tuple[str, str], tuple[tuple[str, str, str | None], int]] = {
    ("persons_without_observation_period", "person"): (("measurePersonCompleteness", "observation_period", None), 1),
    ("observation_periods_of_absent_persons", "observation_period"):
        (("isForeignKey", "observation_period", "person_id"), 2),
    ("observation_period_end_before_start", "observation_period"):
        (("plausibleStartBeforeEnd", "observation_period", "observation_period_start_date"), 1),
    ("duplicate_primary_key", "person"): (("isPrimaryKey", "person", "person_id"), 1),
    ("duplicate_primary_key", "observation_period"):
        (("isPrimaryKey", "observation_period", "observation_period_id"), 2),
    ("duplicate_primary_key", "condition_occurrence"):
        (("isPrimaryKey", "condition_occurrence", "condition_occurrence_id"), 1),
    ("events_outside_observation", "condition_occurrence"):
        (("withinObservationPeriod", "condition_occurrence", "condition_start_date"), 3),
    ("unmapped_concept", "condition_occurrence"):
        (("standardConceptRecordCompleteness", "condition_occurrence", "condition_concept_id"), 2),
    ("death_before_birth", "death"): (("plausibleAfterBirth", "death", "death_date"), 2),
    ("measurement_without_unit", "measurement"): (("valueWithoutUnit", "measurement", "unit_concept_id"), 2),
}


def test_sites_check_and_validate_count_each_defect_the_same(backend, tmp_path: Path, monkeypatch) -> None:
    schema = "cdm"
    defect_cdm(backend.engine, schema)
    monkeypatch.setenv("OMOPFL_DEFECTS_URL", backend.url)
    adapter = tmp_path / "site.toml"
    adapter.write_text(f'[site]\nname = "defects"\n[database]\nurl_env = "OMOPFL_DEFECTS_URL"\n'
                       f'cdm_schema = "{schema}"\nresults_schema = "results"\n')
    site = load_site(adapter)
    with backend.engine.connect() as conn:
        report = check_site(conn, site)
        results = cdm_conformance(conn, site)
    sites = {(f.check, f.table): f.rows for f in report.findings}
    validate = {(r.check, r.table, r.field): r for r in results}
    assert not [r for r in results if "could not run" in r.description]
    for (check, table), (key, planted) in EXPECTED.items():
        assert sites.get((check, table), 0) == planted, (check, table)
        assert validate[key].violated == planted, key
        assert validate[key].failed
    # a clean table: neither reports it
    assert ("duplicate_primary_key", "measurement") not in sites
    assert validate["isPrimaryKey", "measurement", "measurement_id"].violated == 0


def test_row_conditions_come_from_the_check_files() -> None:
    """validate's per-table scan counts the row-level checks by the condition of the same sql/ file `sites
    check` runs; a file of another form is refused rather than half-read."""
    from omopfl.db import sql_row_condition, sql_text

    condition = sql_row_condition("cdm_unmapped_concept", table='"s"."t"', concept_column='"c"')
    assert condition == '("c" = 0 OR "c" IS NULL)'
    assert sql_text("cdm_unmapped_concept", table='"s"."t"', concept_column='"c"').endswith(condition[1:-1])
    assert sql_row_condition("cdm_measurement_without_unit", measurement='"s"."m"') == (
        "(value_as_number IS NOT NULL AND (unit_concept_id IS NULL OR unit_concept_id = 0))")
    with pytest.raises(ValueError, match="not a row-count check"):
        sql_row_condition("cdm_duplicate_primary_keys", table='"s"."t"', key='"k"')
