"""Differential privacy owned by the site: the study states it, the site applies it, counts it, stops at its budget."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import prepare_and_approve

from omopfl import audit, policy
from omopfl.config import load_site
from omopfl.errors import ConfigError
from omopfl.federation.site.audit_trail import audit_path
from omopfl.study import load_study

STATISTICS_EPSILON = 1.0
BUDGET = 2.5


def _private_study(federation: dict[str, Any], name: str, extra: str = "") -> Path:
    spec = load_study(federation["study"])
    bounds = "\n".join(f'{feature} = [0.0, 50000.0]' for feature in spec.feature_names())
    path = federation["tmp"] / name
    path.write_text(federation["study"].read_text() + f"\n[privacy]\nstatistics_epsilon = {STATISTICS_EPSILON}\n"
                    f"delta = 1e-6\nbudget_epsilon = {BUDGET}\n{extra}\n[privacy.bounds]\n"
                    + bounds + "\n")
    return path


def _prepare(federation: dict[str, Any], study: Path, folder: str) -> Path:

    spec = load_study(study)
    prepared = federation["tmp"] / folder
    prepare_and_approve(federation["adapters"], spec, prepared)
    return prepared


@pytest.fixture(scope="module")
def private(prepared_sites_factory) -> dict[str, Any]:
    federation = prepared_sites_factory("privacy", approve=False)
    study = _private_study(federation, "study_dp.toml")
    return {**federation, "dp_study": study, "dp_prepared": _prepare(federation, study, "prepared_dp")}


def test_dp_statistics_follow_the_study_and_stop_at_the_budget(private) -> None:
    from omopfl.federation.local import run_stats

    study, prepared = private["dp_study"], private["dp_prepared"]
    results = [run_stats(study, private["adapters"], prepared, mode="inprocess", out=private["tmp"] / f"s{i}.json")
               for i in range(3)]
    assert [r["sites"]["contributing"] for r in results[:2]] == [["site_a", "site_b", "site_c"]] * 2
    assert results[0]["dp"] is not None
    # two releases of epsilon 1 fit the budget of 2.5; a third would not: every site refuses it
    assert sorted((f["site"], f["code"]) for f in results[2]["sites"]["failed"]) == \
        [("site_a", "budget_spent"), ("site_b", "budget_spent"), ("site_c", "budget_spent")]
    entries = [e for e in audit.read(audit_path(load_site(private["adapters"][0])))
               if e["message_type"] == "query.stats"]
    assert [e.get("privacy", {}).get("epsilon") for e in entries] == [STATISTICS_EPSILON, STATISTICS_EPSILON, None]
    assert [e.get("privacy", {}).get("epsilon_total") for e in entries[:2]] == [1.0, 2.0]
    assert entries[-1]["code"] == "budget_spent"
    # a coordinator asking for other DP settings (less noise) is refused before any budget is looked at
    result = run_stats(study, private["adapters"], prepared, mode="inprocess", out=private["tmp"] / "s9.json",
                       dp={"epsilon": 50.0, "delta": 1e-6, "bounds": {"age": [0.0, 120.0]}})
    assert {f["code"] for f in result["sites"]["failed"]} == {"settings_mismatch"}


def test_a_site_that_requires_dp_refuses_a_study_without_it(private) -> None:
    adapter = private["adapters"][2]
    adapter.write_text(adapter.read_text() + "\n[policy]\ndp_required = true\nepsilon_budget = 4.0\n")
    with pytest.raises(ConfigError, match="dp_required"):
        policy.approve(load_site(adapter), load_study(private["study"]))
