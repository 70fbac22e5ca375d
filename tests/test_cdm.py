"""CDM tables from the specification, created on DuckDB and PostgreSQL; version detection."""

from __future__ import annotations

import sqlalchemy as sa

from omopfl.cdm import CDM_TABLES, RESULTS_TABLES, column_names, create_cdm, create_results
from omopfl.db import detect_cdm_version, existing_tables, qualified, table_columns_in_db


def test_all_required_tables_exist_on_both_backends(backend) -> None:
    with backend.engine.begin() as conn:
        create_cdm(conn, "cdm", "vocab")
        create_results(conn, "results")
    with backend.engine.connect() as conn:
        clinical = existing_tables(conn, "cdm")
        vocab = existing_tables(conn, "vocab")
        results = existing_tables(conn, "results")
    for table in [
        "person", "observation_period", "visit_occurrence", "condition_occurrence", "drug_exposure",
        "procedure_occurrence", "measurement", "observation", "death", "specimen", "location", "care_site",
        "provider", "cdm_source", "image_occurrence", "condition_era", "drug_era",
    ]:
        assert table in clinical
    for table in ["concept", "concept_ancestor", "concept_relationship", "vocabulary", "domain", "concept_class"]:
        assert table in vocab
    assert set(RESULTS_TABLES) <= results
    assert len(CDM_TABLES) == 23  # with condition_era and drug_era (issue 13)
    with backend.engine.connect() as conn:
        cohort_columns = table_columns_in_db(conn, "results", "cohort")
    assert cohort_columns == {"cohort_definition_id", "subject_id", "cohort_start_date", "cohort_end_date"}


def test_required_columns_are_not_null(backend) -> None:
    with backend.engine.begin() as conn:
        create_cdm(conn, "cdm")
    with backend.engine.connect() as conn:
        try:
            conn.execute(sa.text(f"INSERT INTO {qualified('cdm', 'person')} (person_id) VALUES (1)"))
        except sa.exc.DBAPIError as exc:
            assert "null" in str(exc.orig).lower() or "constraint" in str(exc.orig).lower()
        else:
            raise AssertionError("person without gender_concept_id was accepted")


def test_version_detection_from_columns_and_cdm_source(backend) -> None:
    with backend.engine.begin() as conn:
        create_cdm(conn, "v54", version="5.4")
        create_cdm(conn, "v53", version="5.3")
    with backend.engine.connect() as conn:
        assert detect_cdm_version(conn, "v54") == "5.4"
        assert detect_cdm_version(conn, "v53") == "5.3"
        assert "admitting_source_concept_id" in table_columns_in_db(conn, "v53", "visit_occurrence")
    with backend.engine.begin() as conn:  # cdm_source wins when filled in
        conn.execute(
            sa.text(
                f"INSERT INTO {qualified('v53', 'cdm_source')} (cdm_source_name, cdm_source_abbreviation, cdm_holder,"
                " source_release_date, cdm_release_date, cdm_version, vocabulary_version)"
                " VALUES ('x', 'x', 'x', DATE '2020-01-01', DATE '2020-01-01', 'v5.3.1', 'v5')"
            )
        )
    with backend.engine.connect() as conn:
        assert detect_cdm_version(conn, "v53") == "5.3"


def test_53_and_54_column_differences() -> None:
    assert "admitted_from_concept_id" in column_names("visit_occurrence", "5.4")
    assert "admitting_source_concept_id" in column_names("visit_occurrence", "5.3")
    assert "measurement_event_id" not in column_names("measurement", "5.3")
    assert column_names("person", "5.3") == column_names("person", "5.4")
