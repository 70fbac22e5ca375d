"""The outcome of validation: one :class:`CheckResult` per check, collected in a :class:`ValidationReport`.

Both kinds of checks (:mod:`omopfl.expectations` on the feature frame, :mod:`omopfl.conformance` on the
CDM) return :class:`CheckResult` rows; the report sorts them, prints them and raises one
:class:`~omopfl.errors.DataError` naming every fatal failure.  Names and counts only: no row values, no
person ids, no driver text.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from omopfl.errors import DataError

__all__ = ["FATAL", "WARNING", "CheckResult", "ValidationReport"]

FATAL = "fatal"
WARNING = "warning"


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check: names and counts only.

    Attributes
    ----------
    source:
        ``"expectation"`` (feature frame, Great Expectations) or ``"cdm"`` (SQL in the database).
    check:
        Check name; OHDSI DQD names where one applies (``isPrimaryKey``, ``plausibleAfterBirth``, ...).
    table:
        CDM table, or ``"features"`` for the prepared feature frame.
    field:
        Column checked, or None for table-level checks.
    level:
        ``"fatal"`` or ``"warning"``: what a failure of this check means.
    passed:
        Whether the check passed.
    violated:
        Rows violating the check; None when there is nothing to count (absent table or column,
        a check that could not run, the row-count check).
    total:
        Rows checked (rows of the table or frame), or None.
    threshold:
        The limit compared against: the largest share of violating rows (percent) that passes,
        or for ``minPersons`` the smallest row count that passes, or for completeness checks the
        largest share (percent) of missing values that passes.
    description:
        One line for people: what was checked (study and specification numbers only, no data values).
    expectation:
        The Great Expectations expectation type, for ``source="expectation"``.
    """

    source: str
    check: str
    table: str
    field: str | None
    level: str
    passed: bool
    violated: int | None
    total: int | None
    threshold: float | None
    description: str
    expectation: str | None = None

    @property
    def failed(self) -> bool:
        return not self.passed

    @property
    def percent(self) -> float | None:
        """Violating rows as a percent of ``total`` (None when either is unknown or total is 0)."""
        if self.violated is None or not self.total:
            return None
        return 100.0 * self.violated / self.total

    @property
    def where(self) -> str:
        return f"{self.table}.{self.field}" if self.field else self.table

    def counts_text(self) -> str:
        """``"12 of 3400 rows (0.35%)"``, or what is known of it."""
        if self.violated is not None and self.total is not None:
            percent = self.percent
            share = f" ({percent:.3g}%)" if percent is not None else ""
            return f"{self.violated} of {self.total} rows{share}"
        if self.violated is not None:
            return f"{self.violated} rows"
        if self.total is not None:
            return f"{self.total} rows"
        return ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (names, counts, thresholds)."""
        data = dataclasses.asdict(self)
        data["percent"] = self.percent
        return data


def _level_order(result: CheckResult) -> int:
    return 0 if result.level == FATAL else 1


@dataclass
class ValidationReport:
    """All checks run for one site and study; failures are collected, then raised once.

    Attributes
    ----------
    site:
        Site name.
    study:
        Study name, or None for CDM checks alone.
    cdm_version:
        CDM version checked against ("5.4" or "5.3"), or None for frame checks alone.
    persons:
        Rows of the feature frame, or None when no frame was checked.
    results:
        Every check run, passed or failed.
    allow_fatal:
        The site or study overrides fatal failures (they are still reported).
    """

    site: str
    study: str | None = None
    cdm_version: str | None = None
    persons: int | None = None
    results: list[CheckResult] = dataclasses.field(default_factory=list)
    allow_fatal: bool = False

    @property
    def fatal(self) -> list[CheckResult]:
        """Failed checks of level fatal."""
        return [r for r in self.results if r.failed and r.level == FATAL]

    @property
    def warnings(self) -> list[CheckResult]:
        """Failed checks of level warning."""
        return [r for r in self.results if r.failed and r.level == WARNING]

    @property
    def passed(self) -> list[CheckResult]:
        return [r for r in self.results if r.passed]

    @property
    def ok(self) -> bool:
        """True when no check failed fatally, or when fatal failures are overridden by ``allow_fatal``."""
        return not self.fatal or self.allow_fatal

    def extend(self, results: Iterable[CheckResult]) -> None:
        self.results.extend(results)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: names and counts only (no row values, no person ids).

        Keys: ``site``, ``study``, ``cdm_version``, ``persons``, ``ok``, ``allow_fatal``,
        ``fatal_count``, ``warning_count``, ``passed_count``, ``summary_text`` and ``results``
        (failed first, fatal first; each :meth:`CheckResult.to_dict`).
        """
        return {
            "site": self.site,
            "study": self.study,
            "cdm_version": self.cdm_version,
            "persons": self.persons,
            "ok": self.ok,
            "allow_fatal": self.allow_fatal,
            "fatal_count": len(self.fatal),
            "warning_count": len(self.warnings),
            "passed_count": len(self.passed),
            "summary_text": self.summary_text(),
            "results": [r.to_dict() for r in sorted(self.results, key=lambda r: (r.passed, _level_order(r)))],
        }

    def summary_text(self) -> str:
        """A readable multi-line summary: fatal failures first, then warnings, then a count of passed checks."""
        head = f"Validation of site {self.site}"
        if self.study:
            head += f", study {self.study}"
        if self.cdm_version:
            head += f" (CDM {self.cdm_version})"
        if self.persons is not None:
            head += f", {self.persons} persons"
        fatal, warnings = self.fatal, self.warnings
        head += f": {len(fatal)} fatal, {len(warnings)} warning(s), {len(self.passed)} passed"
        lines = [head]
        if fatal and self.allow_fatal:
            lines.append("fatal failures are overridden (allow_fatal): training may proceed")
        elif fatal:
            lines.append("fatal failures stop training unless the site overrides them (allow_fatal)")
        for label, group in (("FATAL", fatal), ("WARNING", warnings)):
            for r in group:
                counts = r.counts_text()
                lines.append(
                    f"  {label:<7} {r.source:<11} {r.where:<45} {r.check:<34} "
                    f"{counts + ': ' if counts else ''}{r.description}"
                )
        if not fatal and not warnings:
            lines.append("  all checks passed")
        return "\n".join(lines)

    def raise_if_fatal(self, allow_fatal: bool = False) -> None:
        """Raise one :class:`DataError` naming every fatal check, unless overridden.

        Parameters
        ----------
        allow_fatal:
            The site overrides fatal failures explicitly (also honoured: ``self.allow_fatal``).

        Raises
        ------
        DataError
            One line: the site, the number of fatal checks and, for each, where, which check and
            its counts.
        """
        fatal = self.fatal
        if not fatal or allow_fatal or self.allow_fatal:
            return
        items = []
        for r in fatal:
            counts = r.counts_text()
            items.append(f"{r.where} {r.check}" + (f" {counts}" if counts else ""))
        study = f" for study {self.study}" if self.study else ""
        message = (
            f"site {self.site}: validation{study} failed with {len(fatal)} fatal check(s): {'; '.join(items)}; "
            "fix the data or override explicitly with allow_fatal"
        )
        raise DataError(" ".join(message.split()))
