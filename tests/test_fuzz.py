"""Fuzzing the parsers: any adapter, study or cohort definition gives a parsed object or omopfl's own error.

Bounded here (``OMOPFL_FUZZ_EXAMPLES`` examples per parser, default 150); ``bench/fuzz_bench.py`` runs the
same targets for longer.  Inputs: valid documents with random parts replaced, removed or added, and raw text.
"""

from __future__ import annotations

import os

import pytest
from fuzzing import TARGETS, check_adapter, check_cohort_json, check_cohort_yaml, check_study
from hypothesis import HealthCheck, given, settings

EXAMPLES = int(os.environ.get("OMOPFL_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_parser_gives_an_object_or_its_own_error(target: str) -> None:
    strategy, check = TARGETS[target]

    @FUZZ
    @given(strategy)
    def run(value) -> None:
        check(value)

    run()


def test_known_crashers_are_refused_in_one_line() -> None:
    """Inputs that once raised something other than OmopflError (issue 11)."""
    deep = "[" * 100_000 + "]" * 100_000
    for text in ('{"ConceptSets": 5, "PrimaryCriteria": {"CriteriaList": [{"ConditionOccurrence": {}}]}}',
                 '{"PrimaryCriteria": {"CriteriaList": 5}}', '{"PrimaryCriteria": {"CriteriaList": [5]}}',
                 deep, '{"PrimaryCriteria": {"CriteriaList": [{"ConditionOccurrence": {"CodesetId": 1.5}}]}}',
                 '{"a": NaN}'):
        assert check_cohort_json(text) == "refused"
    for text in ("name: x\nconcept_sets: {a: [1]}\nentry: {events: [{condition_occurrence: [a]}]}\n",
                 "name: x\nconcept_sets: {a: [1]}\nentry: {events: [{condition_occurrence: a}], limit: [1]}\n",
                 "a: " + "[" * 3000 + "]" * 3000):
        assert check_cohort_yaml(text) == "refused"
    assert check_study(b"\xff\xfe[study]\n") == "refused"
    assert check_adapter('[site]\nname = "."\n[database]\nduckdb_path = "omop.duckdb"\ncdm_schema = "cdm"\n'
                         'results_schema = "results"\n') == "refused"
