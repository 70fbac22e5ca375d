"""One exception tree for omopfl, and the one mapping from an exception to the code a site sends.

Every error carries an exit code (what the CLI exits with) and a wire code (what a site sends instead
of any text when a message fails: :data:`WIRE_CODES`, :func:`wire_code`), and a message that is safe
to show outside the site: it names files, keys, tables or columns and says what to do, but never
contains patient values, identifiers, file paths of patient data, or driver text that could echo row
contents.  (The message never leaves a site: only the wire code does.)
"""

from __future__ import annotations

__all__ = [
    "OmopflError",
    "ConfigError",
    "DatabaseError",
    "CdmError",
    "DataError",
    "FederationError",
    "FlowerVersionError",
    "RoundsFailed",
    "CodecError",
    "ReleaseViolation",
    "SiteFailure",
    "Refusal",
    "WorkerUnavailable",
    "WIRE_CODES",
    "wire_code",
]

WIRE_CODES = frozenset({
    "bad_request",       # the server's message could not be decoded or has another protocol version
    "config",            # the site's adapter (node config) is missing or invalid
    "not_prepared",      # no prepared dataset for this site (run omopfl prepare)
    "study_mismatch",    # the dataset was prepared for another version of the study
    "feature_mismatch",  # the global scaler's features differ from the site's dataset
    "dp_bounds",         # differential privacy requested without valid bounds for every feature
    "internal",          # anything else; the site's own log says more
    # refusals of the site's trust boundary (omopfl.federation.site.app)
    "study_not_approved",  # the message names a study the site's data engineer has not approved (or revoked)
    "settings_mismatch",   # the message's settings differ from the approved study's
    "policy",              # the site's policy forbids it (model kind, rounds, metrics, DP)
    "round_limit",         # more rounds than the approved study (or the site's policy) allows
    "foreign_app",         # the app's components are not omopfl's own
    "code_in_bundle",      # the app bundle holds more than its pyproject.toml
    "not_allowed",         # a message type omopfl's site app does not serve
    "release_rule",        # the reply would break the site's release rule (omopfl.release)
    "budget_spent",        # the study's privacy budget at this site is spent (omopfl.budget)
    "secagg_refused",      # a secure-aggregation step was refused (participants, keys, order; omopfl.secagg)
})
"""Fixed error codes a site may send; nothing else about an error leaves a site."""


class OmopflError(Exception):
    """Base of every error omopfl raises on purpose.

    Parameters
    ----------
    message:
        One line, safe to print and to send off-site.
    """

    exit_code: int = 1
    wire_code: str = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(OmopflError):
    """A site adapter or study file is missing, malformed or incomplete."""

    exit_code = 2
    wire_code = "config"


class DatabaseError(OmopflError):
    """The database cannot be reached or a statement failed."""

    exit_code = 3


class CdmError(OmopflError):
    """The database does not hold a usable OMOP CDM in the configured schema."""

    exit_code = 4


class DataError(OmopflError):
    """Input data (files, cohorts, definitions) is unusable."""

    exit_code = 5
    wire_code = "not_prepared"


class FederationError(OmopflError):
    """A federated run could not be started or did not produce a result."""

    exit_code = 7


class FlowerVersionError(FederationError):
    """The installed Flower is not one omopfl's site runtime was checked against (a site does not serve)."""



class RoundsFailed(FederationError):
    """Too few sites took part in a federated phase to go on (the last checkpoint is kept)."""


class CodecError(OmopflError, ValueError):
    """A message does not follow the wire format; the text names keys, never values."""

    exit_code = 7
    wire_code = "bad_request"


class ReleaseViolation(OmopflError):
    """A reply about to leave holds a number the release rule forbids (the site sends a fixed code)."""

    wire_code = "release_rule"


class SiteFailure(OmopflError):
    """A failure a site reports with a fixed code (:data:`WIRE_CODES`; an unknown code becomes ``internal``)."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code if code in WIRE_CODES else "internal"
        self.wire_code = self.code


class Refusal(SiteFailure):
    """The site's trust boundary refuses the message (a fixed code, :data:`WIRE_CODES`)."""


class WorkerUnavailable(FederationError):
    """A site's long-lived worker socket does not answer (not started, or gone)."""


def wire_code(exc: BaseException) -> str:
    """The fixed code a failure is reported with off-site (never its text: it may echo data)."""
    return str(getattr(exc, "wire_code", "internal")) if isinstance(exc, OmopflError) else "internal"
