"""One exception tree for omopfl.

Every error carries an exit code and a message that is safe to show outside the
site: it names files, keys, tables or columns and says what to do, but never
contains patient values, identifiers, file paths of patient data, or driver text
that could echo row contents.
"""

from __future__ import annotations

__all__ = [
    "OmopflError",
    "ConfigError",
    "DatabaseError",
    "CdmError",
    "DataError",
    "FederationError",
]


class OmopflError(Exception):
    """Base of every error omopfl raises on purpose.

    Parameters
    ----------
    message:
        One line, safe to print and to send off-site.
    """

    exit_code: int = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(OmopflError):
    """A site adapter or study file is missing, malformed or incomplete."""

    exit_code = 2


class DatabaseError(OmopflError):
    """The database cannot be reached or a statement failed."""

    exit_code = 3


class CdmError(OmopflError):
    """The database does not hold a usable OMOP CDM in the configured schema."""

    exit_code = 4


class DataError(OmopflError):
    """Input data (files, cohorts, definitions) is unusable."""

    exit_code = 5


class FederationError(OmopflError):
    """A federated run could not be started or did not produce a result."""

    exit_code = 7
