"""The OMOP Common Data Model tables omopfl reads, written from the OHDSI specification.

Covers CDM 5.4 (and the column differences of 5.3) for the clinical, health-system,
metadata and vocabulary tables omopfl uses, plus the Medical Imaging extension's
``image_occurrence``, and the OHDSI results tables (cohort and inclusion-rule
attrition, as CohortGenerator lays them out).

Column notation in the compact specs below: ``name:type`` with a trailing ``!``
for NOT NULL and ``*`` for the primary key.  Types: ``int``, ``bigint``, ``float``, ``date``,
``datetime``, ``vcN`` (varchar of length N) and ``text``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import sqlalchemy as sa

from omopfl.config import SiteConfig, check_identifier
from omopfl.db import detect_cdm_version, existing_tables, qualified, quote_identifier, schema_exists, sql_text
from omopfl.errors import CdmError, DatabaseError

__all__ = [
    "CDM_TABLES",
    "VOCABULARY_TABLES",
    "CLINICAL_TABLES",
    "RESULTS_TABLES",
    "EVENT_TABLES",
    "ColumnSpec",
    "cdm_metadata",
    "results_metadata",
    "create_cdm",
    "create_results",
    "column_names",
    "CdmInfo",
    "inspect_cdm",
    "bulk_insert",
]

_CDM54: dict[str, str] = {
    # Clinical data
    "person": (
        "person_id:int!* gender_concept_id:int! year_of_birth:int! month_of_birth:int day_of_birth:int "
        "birth_datetime:datetime race_concept_id:int! ethnicity_concept_id:int! location_id:int "
        "provider_id:int care_site_id:int person_source_value:vc50 gender_source_value:vc50 "
        "gender_source_concept_id:int race_source_value:vc50 race_source_concept_id:int "
        "ethnicity_source_value:vc50 ethnicity_source_concept_id:int"
    ),
    "observation_period": (
        "observation_period_id:int!* person_id:int! observation_period_start_date:date! "
        "observation_period_end_date:date! period_type_concept_id:int!"
    ),
    "visit_occurrence": (
        "visit_occurrence_id:int!* person_id:int! visit_concept_id:int! visit_start_date:date! "
        "visit_start_datetime:datetime visit_end_date:date! visit_end_datetime:datetime "
        "visit_type_concept_id:int! provider_id:int care_site_id:int visit_source_value:vc50 "
        "visit_source_concept_id:int admitted_from_concept_id:int admitted_from_source_value:vc50 "
        "discharged_to_concept_id:int discharged_to_source_value:vc50 preceding_visit_occurrence_id:int"
    ),
    "condition_occurrence": (
        "condition_occurrence_id:int!* person_id:int! condition_concept_id:int! condition_start_date:date! "
        "condition_start_datetime:datetime condition_end_date:date condition_end_datetime:datetime "
        "condition_type_concept_id:int! condition_status_concept_id:int stop_reason:vc20 provider_id:int "
        "visit_occurrence_id:int visit_detail_id:int condition_source_value:vc50 "
        "condition_source_concept_id:int condition_status_source_value:vc50"
    ),
    "drug_exposure": (
        "drug_exposure_id:int!* person_id:int! drug_concept_id:int! drug_exposure_start_date:date! "
        "drug_exposure_start_datetime:datetime drug_exposure_end_date:date! drug_exposure_end_datetime:datetime "
        "verbatim_end_date:date drug_type_concept_id:int! stop_reason:vc20 refills:int quantity:float "
        "days_supply:int sig:text route_concept_id:int lot_number:vc50 provider_id:int "
        "visit_occurrence_id:int visit_detail_id:int drug_source_value:vc50 drug_source_concept_id:int "
        "route_source_value:vc50 dose_unit_source_value:vc50"
    ),
    "procedure_occurrence": (
        "procedure_occurrence_id:int!* person_id:int! procedure_concept_id:int! procedure_date:date! "
        "procedure_datetime:datetime procedure_end_date:date procedure_end_datetime:datetime "
        "procedure_type_concept_id:int! modifier_concept_id:int quantity:int provider_id:int "
        "visit_occurrence_id:int visit_detail_id:int procedure_source_value:vc50 "
        "procedure_source_concept_id:int modifier_source_value:vc50"
    ),
    "measurement": (
        "measurement_id:int!* person_id:int! measurement_concept_id:int! measurement_date:date! "
        "measurement_datetime:datetime measurement_time:vc10 measurement_type_concept_id:int! "
        "operator_concept_id:int value_as_number:float value_as_concept_id:int unit_concept_id:int "
        "range_low:float range_high:float provider_id:int visit_occurrence_id:int visit_detail_id:int "
        "measurement_source_value:vc50 measurement_source_concept_id:int unit_source_value:vc50 "
        "unit_source_concept_id:int value_source_value:vc50 measurement_event_id:int "
        "meas_event_field_concept_id:int"
    ),
    "observation": (
        "observation_id:int!* person_id:int! observation_concept_id:int! observation_date:date! "
        "observation_datetime:datetime observation_type_concept_id:int! value_as_number:float "
        "value_as_string:vc60 value_as_concept_id:int qualifier_concept_id:int unit_concept_id:int "
        "provider_id:int visit_occurrence_id:int visit_detail_id:int observation_source_value:vc50 "
        "observation_source_concept_id:int unit_source_value:vc50 qualifier_source_value:vc50 "
        "value_source_value:vc50 observation_event_id:int obs_event_field_concept_id:int"
    ),
    "death": (
        "person_id:int! death_date:date! death_datetime:datetime death_type_concept_id:int "
        "cause_concept_id:int cause_source_value:vc50 cause_source_concept_id:int"
    ),
    "specimen": (
        "specimen_id:int!* person_id:int! specimen_concept_id:int! specimen_type_concept_id:int! "
        "specimen_date:date! specimen_datetime:datetime quantity:float unit_concept_id:int "
        "anatomic_site_concept_id:int disease_status_concept_id:int specimen_source_id:vc50 "
        "specimen_source_value:vc50 unit_source_value:vc50 anatomic_site_source_value:vc50 "
        "disease_status_source_value:vc50"
    ),
    # Health system data
    "location": (
        "location_id:int!* address_1:vc50 address_2:vc50 city:vc50 state:vc2 zip:vc9 county:vc20 "
        "location_source_value:vc50 country_concept_id:int country_source_value:vc80 latitude:float "
        "longitude:float"
    ),
    "care_site": (
        "care_site_id:int!* care_site_name:vc255 place_of_service_concept_id:int location_id:int "
        "care_site_source_value:vc50 place_of_service_source_value:vc50"
    ),
    "provider": (
        "provider_id:int!* provider_name:vc255 npi:vc20 dea:vc20 specialty_concept_id:int care_site_id:int "
        "year_of_birth:int gender_concept_id:int provider_source_value:vc50 specialty_source_value:vc50 "
        "specialty_source_concept_id:int gender_source_value:vc50 gender_source_concept_id:int"
    ),
    # Metadata
    "cdm_source": (
        "cdm_source_name:vc255! cdm_source_abbreviation:vc25! cdm_holder:vc255! source_description:text "
        "source_documentation_reference:vc255 cdm_etl_reference:vc255 source_release_date:date! "
        "cdm_release_date:date! cdm_version:vc10 cdm_version_concept_id:int! vocabulary_version:vc20!"
    ),
    # Standardized derived elements (eras): omopfl reads them, it does not build them
    "condition_era": (
        "condition_era_id:int!* person_id:int! condition_concept_id:int! condition_era_start_date:date! "
        "condition_era_end_date:date! condition_occurrence_count:int"
    ),
    "drug_era": (
        "drug_era_id:int!* person_id:int! drug_concept_id:int! drug_era_start_date:date! drug_era_end_date:date! "
        "drug_exposure_count:int gap_days:int"
    ),
    # Medical Imaging extension (OHDSI Imaging WG)
    "image_occurrence": (
        "image_occurrence_id:int!* person_id:int! visit_occurrence_id:int procedure_occurrence_id:int! "
        "wadors_uri:text local_path:text image_occurrence_date:date! image_study_uid:vc250! "
        "image_series_uid:vc250! modality_concept_id:int! anatomic_site_concept_id:int"
    ),
}

_VOCAB: dict[str, str] = {
    "concept": (
        "concept_id:int!* concept_name:vc255! domain_id:vc20! vocabulary_id:vc20! concept_class_id:vc20! "
        "standard_concept:vc1 concept_code:vc50! valid_start_date:date! valid_end_date:date! invalid_reason:vc1"
    ),
    "concept_ancestor": (
        "ancestor_concept_id:int! descendant_concept_id:int! min_levels_of_separation:int! "
        "max_levels_of_separation:int!"
    ),
    "concept_relationship": (
        "concept_id_1:int! concept_id_2:int! relationship_id:vc20! valid_start_date:date! "
        "valid_end_date:date! invalid_reason:vc1"
    ),
    "vocabulary": (
        "vocabulary_id:vc20!* vocabulary_name:vc255! vocabulary_reference:vc255 vocabulary_version:vc255 "
        "vocabulary_concept_id:int!"
    ),
    "domain": "domain_id:vc20!* domain_name:vc255! domain_concept_id:int!",
    "concept_class": "concept_class_id:vc20!* concept_class_name:vc255! concept_class_concept_id:int!",
}

# CDM 5.3 differs from 5.4 in these columns (5.4 name -> 5.3 name, None = absent in 5.3).
_V53_RENAMES: dict[str, dict[str, str | None]] = {
    "visit_occurrence": {
        "admitted_from_concept_id": "admitting_source_concept_id",
        "admitted_from_source_value": "admitting_source_value",
        "discharged_to_concept_id": "discharge_to_concept_id",
        "discharged_to_source_value": "discharge_to_source_value",
    },
    "procedure_occurrence": {"procedure_end_date": None, "procedure_end_datetime": None},
    "measurement": {"measurement_event_id": None, "meas_event_field_concept_id": None, "unit_source_concept_id": None},
    "observation": {
        "value_source_value": None,
        "observation_event_id": None,
        "obs_event_field_concept_id": None,
    },
    "location": {"country_concept_id": None, "country_source_value": None, "latitude": None, "longitude": None},
    "cdm_source": {"cdm_version_concept_id": None},
}

_RESULTS: dict[str, str] = {
    # Counts, masks and subject ids are BIGINT as in OHDSI CohortGenerator: an inclusion-rule mask
    # is 2**rules - 1 and overflows 32 bits beyond 31 rules.
    "cohort": "cohort_definition_id:bigint! subject_id:bigint! cohort_start_date:date! cohort_end_date:date!",
    "cohort_definition": (
        "cohort_definition_id:bigint!* cohort_name:vc255! definition_hash:vc64! translator:vc32! "
        "built_at:datetime! person_count:bigint! record_count:bigint!"
    ),
    "cohort_inclusion": "cohort_definition_id:bigint! rule_sequence:int! name:vc255 description:text",
    "cohort_inclusion_result": (
        "cohort_definition_id:bigint! inclusion_rule_mask:bigint! person_count:bigint! mode_id:int!"
    ),
    "cohort_inclusion_stats": (
        "cohort_definition_id:bigint! rule_sequence:int! person_count:bigint! gain_count:bigint! "
        "person_total:bigint! mode_id:int!"
    ),
    "cohort_summary_stats": "cohort_definition_id:bigint! base_count:bigint! final_count:bigint! mode_id:int!",
    "cohort_censor_stats": "cohort_definition_id:bigint! lost_count:bigint!",
}

CLINICAL_TABLES: tuple[str, ...] = tuple(_CDM54)
VOCABULARY_TABLES: tuple[str, ...] = tuple(_VOCAB)
CDM_TABLES: tuple[str, ...] = CLINICAL_TABLES + VOCABULARY_TABLES
RESULTS_TABLES: tuple[str, ...] = tuple(_RESULTS)

# The event tables the CDM checks of `omopfl sites check` and `omopfl validate` look at: start date,
# end date (None if the table has none) and concept column.
EVENT_TABLES: dict[str, tuple[str, str | None, str]] = {
    "visit_occurrence": ("visit_start_date", "visit_end_date", "visit_concept_id"),
    "condition_occurrence": ("condition_start_date", "condition_end_date", "condition_concept_id"),
    "drug_exposure": ("drug_exposure_start_date", "drug_exposure_end_date", "drug_concept_id"),
    "procedure_occurrence": ("procedure_date", "procedure_end_date", "procedure_concept_id"),
    "measurement": ("measurement_date", None, "measurement_concept_id"),
    "observation": ("observation_date", None, "observation_concept_id"),
}


@dataclass(frozen=True)
class ColumnSpec:
    """One CDM column."""

    name: str
    type: str
    required: bool
    primary_key: bool

    def sa_type(self) -> sa.types.TypeEngine:
        if self.type == "int":
            return sa.Integer()
        if self.type == "bigint":
            return sa.BigInteger()
        if self.type == "float":
            return sa.Float(53)
        if self.type == "date":
            return sa.Date()
        if self.type == "datetime":
            return sa.DateTime()
        if self.type == "text":
            return sa.Text()
        if self.type.startswith("vc"):
            return sa.String(int(self.type[2:]))
        raise ValueError(f"unknown column type {self.type}")


def _parse(spec: str) -> list[ColumnSpec]:
    columns = []
    for token in spec.split():
        name, kind = token.split(":")
        primary_key = kind.endswith("*")
        kind = kind.rstrip("*")
        required = kind.endswith("!")
        columns.append(ColumnSpec(name, kind.rstrip("!"), required, primary_key))
    return columns


def table_columns(table: str, version: str = "5.4") -> list[ColumnSpec]:
    """Columns of a CDM or results table for a CDM version ("5.4" or "5.3")."""
    spec = _CDM54.get(table) or _VOCAB.get(table) or _RESULTS.get(table)
    if spec is None:
        raise KeyError(table)
    columns = _parse(spec)
    if version.startswith("5.3"):
        renames = _V53_RENAMES.get(table, {})
        out = []
        for column in columns:
            if column.name in renames:
                new = renames[column.name]
                if new is None:
                    continue
                column = ColumnSpec(new, column.type, column.required, column.primary_key)
            out.append(column)
        columns = out
    return columns


def column_names(table: str, version: str = "5.4") -> list[str]:
    """Names of a table's columns, in specification order."""
    return [c.name for c in table_columns(table, version)]


def _build(metadata: sa.MetaData, tables: Iterable[str], version: str, primary_keys: bool) -> sa.MetaData:
    for table in tables:
        columns = [
            sa.Column(c.name, c.sa_type(), nullable=not c.required, primary_key=primary_keys and c.primary_key)
            for c in table_columns(table, version)
        ]
        sa.Table(table, metadata, *columns)
    return metadata


def cdm_metadata(
    cdm_schema: str, vocabulary_schema: str | None = None, version: str = "5.4", primary_keys: bool = True
) -> sa.MetaData:
    """SQLAlchemy metadata of the CDM (clinical tables in ``cdm_schema``, vocabulary in ``vocabulary_schema``)."""
    vocabulary_schema = vocabulary_schema or cdm_schema
    metadata = sa.MetaData()
    clinical = _build(sa.MetaData(schema=cdm_schema), CLINICAL_TABLES, version, primary_keys)
    vocab = _build(sa.MetaData(schema=vocabulary_schema), VOCABULARY_TABLES, version, primary_keys)
    for table in (*clinical.tables.values(), *vocab.tables.values()):
        table.to_metadata(metadata)
    return metadata


def results_metadata(results_schema: str) -> sa.MetaData:
    """SQLAlchemy metadata of the results schema (cohort table and attrition)."""
    return _build(sa.MetaData(schema=results_schema), RESULTS_TABLES, "5.4", primary_keys=True)


def _ensure_schema(conn: sa.Connection, schema: str) -> None:
    # Checked first: CREATE SCHEMA IF NOT EXISTS needs CREATE on the database even when the schema
    # exists, which a site's omopfl role may rightly lack.
    if not schema_exists(conn, schema):
        conn.execute(sa.text(sql_text("create_schema", schema=quote_identifier(schema))))


def create_cdm(
    conn: sa.Connection,
    cdm_schema: str,
    vocabulary_schema: str | None = None,
    version: str = "5.4",
    primary_keys: bool = True,
) -> None:
    """Create the CDM tables (if absent) in the given schemas on an open connection."""
    vocabulary_schema = vocabulary_schema or cdm_schema
    for schema in {cdm_schema, vocabulary_schema}:
        _ensure_schema(conn, schema)
    cdm_metadata(cdm_schema, vocabulary_schema, version, primary_keys).create_all(conn)


def create_results(conn: sa.Connection, results_schema: str) -> None:
    """Create the results schema and its cohort/attrition tables (if absent)."""
    _ensure_schema(conn, results_schema)
    results_metadata(results_schema).create_all(conn)


@dataclass
class CdmInfo:
    """What is in a site's CDM schema."""

    version: str
    tables: set[str] = field(default_factory=set)
    missing: list[str] = field(default_factory=list)


def inspect_cdm(conn: sa.Connection, site: SiteConfig) -> CdmInfo:
    """Check that the site's schemas hold an OMOP CDM, and return its version and tables.

    Raises
    ------
    CdmError
        When the CDM schema is absent or holds no CDM tables.
    """
    where = f"{site.source}: " if site.source else ""
    if not schema_exists(conn, site.cdm_schema):
        raise CdmError(
            f"{where}[database] cdm_schema {site.cdm_schema} does not exist in the database; check the adapter"
        )
    tables = existing_tables(conn, site.cdm_schema)
    if site.vocabulary_schema != site.cdm_schema:
        if not schema_exists(conn, site.vocabulary_schema):
            raise CdmError(
                f"{where}[database] vocabulary_schema {site.vocabulary_schema} does not exist; check the adapter"
            )
        vocab_tables = existing_tables(conn, site.vocabulary_schema)
    else:
        vocab_tables = tables
    if "person" not in tables or "observation_period" not in tables:
        raise CdmError(
            f"{where}schema {site.cdm_schema} has no OMOP CDM (person and observation_period tables missing); "
            "load a CDM or fix [database] cdm_schema"
        )
    version = detect_cdm_version(conn, site.cdm_schema)
    missing = [t for t in CLINICAL_TABLES if t not in tables]
    missing += [t for t in VOCABULARY_TABLES if t not in vocab_tables]
    return CdmInfo(version=version, tables=tables | vocab_tables, missing=missing)


def _raw_connection(conn: sa.Connection):
    return conn.connection.driver_connection


def bulk_insert(conn: sa.Connection, schema: str, table: str, frame) -> int:
    """Append a DataFrame to ``schema.table`` with the backend's bulk path.

    PostgreSQL uses ``COPY ... FROM STDIN`` (CSV) through the open connection's
    transaction; DuckDB inserts from the registered frame.  Column names of the
    frame must be a subset of the table's; floats holding whole numbers for an
    integer column are written as integers.  Returns the number of rows written.
    """
    import io

    import pandas as pd

    if len(frame) == 0:
        return 0
    target = qualified(schema, table)
    columns = list(frame.columns)
    for name in columns:
        check_identifier(name, f"column of {table}")
    try:
        int_columns = {c.name for c in table_columns(table) if c.type == "int"}
    except KeyError:
        int_columns = set()
    frame = frame.copy(deep=False)
    for name in columns:
        if name in int_columns and pd.api.types.is_float_dtype(frame[name].dtype):
            frame[name] = frame[name].astype("Int64")
    column_list = ", ".join(quote_identifier(c) for c in columns)
    if conn.dialect.name == "postgresql":
        buffer = io.StringIO()
        frame.to_csv(buffer, index=False, header=False, date_format="%Y-%m-%d %H:%M:%S", na_rep="")
        buffer.seek(0)
        raw = _raw_connection(conn)
        sql = f"COPY {target} ({column_list}) FROM STDIN WITH (FORMAT csv, NULL '')"
        if hasattr(raw, "cursor") and hasattr(raw.cursor(), "copy_expert"):
            with raw.cursor() as cursor:
                cursor.copy_expert(sql, buffer)
        else:  # psycopg 3
            with raw.cursor() as cursor, cursor.copy(sql) as copy:
                while chunk := buffer.read(1 << 20):
                    copy.write(chunk)
        return len(frame)
    if conn.dialect.name == "duckdb":
        raw = _raw_connection(conn)
        view = f"omopfl_bulk_{table}"
        raw.register(view, frame)
        try:
            raw.execute(f"INSERT INTO {target} ({column_list}) SELECT {column_list} FROM {view}")
        finally:
            raw.unregister(view)
        return len(frame)
    raise DatabaseError(f"bulk insert not supported on {conn.dialect.name}")
