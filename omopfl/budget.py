"""A site's privacy budget per approved study: what it has spent, and whether the next release fits.

The ledger is ``<state dir>/budget/<study hash>.json``::

    {"statistics": [0.5, 0.5], "metrics": [0.2], "dp_sgd": [[noise_multiplier, sample_rate, steps], ...],
     "delta": 1e-06}

Statistics releases are Gaussian-mechanism releases of (epsilon, delta) each; evaluation-metric releases
are pure epsilon-DP (:mod:`omopfl.dp_metrics`); DP-SGD rounds are the
Opacus RDP accountant's steps (:mod:`omopfl.dp`).  The total is their basic composition (epsilons
add, so do deltas): conservative, and simple to check by hand.  The site's limit for a study is the
smaller of the study's ``[privacy] budget_epsilon`` and its own policy's ``epsilon_budget``; with
neither, releases are recorded but not limited.  The ledger is written before the reply leaves (an
unsent reply may be counted; a sent one is never missed).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = ["Ledger", "limit"]


def limit(study_budget: float | None, policy_budget: float | None) -> float | None:
    """The site's epsilon limit for a study (None: no limit)."""
    values = [v for v in (study_budget, policy_budget) if v is not None]
    return min(values) if values else None


class Ledger:
    """The privacy ledger of one study at one site."""

    def __init__(self, state_dir: Path, study_hash: str, delta: float) -> None:
        self.path = Path(state_dir) / "budget" / f"{study_hash}.json"
        self.delta = float(delta)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            data = self.read()
            yield data
            with tempfile.NamedTemporaryFile("w", dir=self.path.parent, delete=False, suffix=".tmp") as tmp:
                json.dump(data, tmp)
            os.replace(tmp.name, self.path)
        finally:
            os.close(fd)

    def read(self) -> dict[str, Any]:
        if not self.path.is_file():
            return {"statistics": [], "metrics": [], "dp_sgd": [], "delta": self.delta}
        data = json.loads(self.path.read_text())
        return {"statistics": list(data.get("statistics", [])), "metrics": list(data.get("metrics", [])),
                "dp_sgd": list(data.get("dp_sgd", [])),
                "delta": float(data.get("delta", self.delta))}

    @staticmethod
    def _total(data: dict[str, Any], delta: float) -> float:
        total = float(sum(data["statistics"])) + float(sum(data.get("metrics", [])))
        if data["dp_sgd"]:
            from omopfl.dp import epsilon_spent

            total += epsilon_spent(data["dp_sgd"], delta)
        return total

    def spent(self) -> float:
        """Epsilon spent on this study so far."""
        return self._total(self.read(), self.delta)

    def fits(self, epsilon_limit: float | None, *, statistics: float = 0.0, metrics: float = 0.0,
             dp_step: Sequence[float] | None = None) -> bool:
        """Would the next release (a statistics or metrics epsilon, or a DP-SGD round) stay within the limit?"""
        if epsilon_limit is None:
            return True
        data = self.read()
        data["statistics"].append(float(statistics))
        data["metrics"].append(float(metrics))
        if dp_step is not None:
            data["dp_sgd"].append(list(dp_step))
        return self._total(data, self.delta) <= epsilon_limit + 1e-9

    def charge(self, *, statistics: float = 0.0, metrics: float = 0.0,
               dp_step: Sequence[float] | None = None) -> float:
        """Record a release; returns the epsilon spent in all after it."""
        with self._locked() as data:
            if statistics:
                data["statistics"].append(float(statistics))
            if metrics:
                data["metrics"].append(float(metrics))
            if dp_step is not None:
                data["dp_sgd"].append([float(v) for v in dp_step])
            total = self._total(data, self.delta)
        return total
