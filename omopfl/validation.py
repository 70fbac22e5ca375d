"""Validation before training: Great Expectations on the feature frame, OHDSI-style checks on the CDM.

Two kinds of checks feed one :class:`~omopfl.validation_report.ValidationReport`
(:mod:`omopfl.validation_report`):

* **expectations** (``source="expectation"``, :mod:`omopfl.expectations`): a Great Expectations suite
  generated from the study specification and run on the prepared feature frame (one row per person);
* **CDM conformance** (``source="cdm"``, :mod:`omopfl.conformance`): checks in the spirit of the OHDSI
  Data Quality Dashboard, run as SQL in the site's database; only counts come back.

All failures are collected first; :meth:`ValidationReport.raise_if_fatal` then raises one
:class:`~omopfl.errors.DataError` naming every fatal check.  A fatal failure stops training
unless the site overrides it explicitly (``[validation] allow_fatal`` or ``allow_fatal=True``);
warnings never stop it.  Every result carries counts and names only: no row values, no person
ids, no driver text.  The checks and their levels are listed in the docstrings of
:mod:`omopfl.expectations` and :mod:`omopfl.conformance`; this module runs both (:func:`validate`) and
re-exports their public names.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import sqlalchemy as sa

from omopfl.config import SiteConfig
from omopfl.conformance import cdm_conformance, check_cdm
from omopfl.errors import DataError
from omopfl.expectations import (
    END_DATE_COLUMNS,
    FRAME_TABLE,
    KEY_COLUMNS,
    START_DATE_COLUMNS,
    expectation_suite_for,
    run_expectations,
)
from omopfl.study import StudyConfig
from omopfl.validation_report import FATAL, WARNING, CheckResult, ValidationReport

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "FATAL",
    "WARNING",
    "CheckResult",
    "ValidationReport",
    "expectation_suite_for",
    "run_expectations",
    "cdm_conformance",
    "validate",
    "FRAME_TABLE",
    "KEY_COLUMNS",
    "START_DATE_COLUMNS",
    "END_DATE_COLUMNS",
]


def validate(
    conn: sa.Connection,
    site: SiteConfig,
    study: StudyConfig,
    frame: pd.DataFrame,
    cdm_version: str | None = None,
    *,
    feature_columns: Sequence[str] | None = None,
) -> ValidationReport:
    """Check a site's CDM and its prepared feature frame; collect every failure in one report.

    Parameters
    ----------
    conn:
        Open connection to the site's database.
    site:
        The site's configuration.
    study:
        The study (features, plausible ranges, ``[validation]`` thresholds and ``allow_fatal``).
    frame:
        The prepared features, one row per person: a DataFrame with ``person_id``, ``label``,
        ``index_date`` and the feature columns.
    cdm_version:
        "5.4" or "5.3"; None detects it.
    feature_columns:
        Model feature columns of the frame (each must be numeric); default: the study's features
        (``study.feature_names()``).  Other frame columns are checked only as key or date columns.

    Returns
    -------
    ValidationReport
        Nothing is raised for data problems: call :meth:`ValidationReport.raise_if_fatal`.
    """
    import pandas as pd

    if not isinstance(frame, pd.DataFrame):
        raise DataError(f"validation: expected a pandas DataFrame of features, got {type(frame).__name__}")
    if feature_columns is None:
        feature_columns = study.feature_names()
    version, cdm_results = check_cdm(conn, site, cdm_version, study=study)
    report = ValidationReport(site=site.name, study=study.name, cdm_version=version, persons=len(frame),
                              allow_fatal=study.validation.allow_fatal)
    report.extend(cdm_results)
    suite = expectation_suite_for(study, feature_columns, columns=list(frame.columns))
    report.extend(run_expectations(suite, frame))
    return report
