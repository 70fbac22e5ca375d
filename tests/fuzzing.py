"""Hypothesis strategies and targets shared by tests/test_fuzz.py (bounded, in CI) and bench/fuzz_bench.py (long).

Each target takes generated input, runs one of omopfl's parsers on it and returns normally when the parser
gave a parsed object or omopfl's own :class:`~omopfl.errors.OmopflError`; anything else propagates and is a
bug.  Inputs are valid documents with random parts replaced, deleted or added (so the parsers get past their
first checks), plus raw text and bytes.
"""

from __future__ import annotations

import copy
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tomli_w
import yaml
from hypothesis import strategies as st

from omopfl.cohort import CohortDefinition, parse_definition
from omopfl.cohort_yaml import yaml_to_circe
from omopfl.config import SiteConfig, load_site
from omopfl.errors import OmopflError
from omopfl.study import StudyConfig, load_study

ROOT = Path(__file__).resolve().parents[1]
COHORTS = ROOT / "cohorts"

GOOD_ADAPTER: dict[str, Any] = {
    "site": {"name": "site_a", "min_cell_count": 10},
    "database": {"duckdb_path": "omop.duckdb", "cdm_schema": "cdm", "vocabulary_schema": "cdm",
                 "results_schema": "results"},
    "files": {"image_root": "images", "omics_root": "omics"},
}

_names = st.sampled_from(["name", "min_cell_count", "duckdb_path", "url_env", "cdm_schema", "results_schema",
                          "window", "concepts", "range", "unit", "analyte", "rounds", "hidden", "dropout", "id",
                          "CodesetId", "CONCEPT_ID", "items", "expression", "CriteriaList", "ConceptSets",
                          "sex_male", "glucose__missing", "x__unknown_unit", ".", "..", "CDM", "policy", ""])
_scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2**31, 2**63, -(2**63), 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e308, -0.0, 0.5, 1.0]),
    st.text(max_size=12),
    st.sampled_from([".", "..", "../x", "a/b", "CDM", "cdm", "results", "sex_male", "glucose__missing", "\x00",
                     "all", "first", "t2dm", "mg/dL", "~nobody/x"]),
)
# JSON-like values (TOML has no null: a None is dropped by the TOML writer's caller below)
values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(_names | st.text(max_size=6), inner,
                                                                         max_size=4)), max_leaves=12)


def _paths(document: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (tuple of keys and indexes) into a nested dict/list document."""
    out = [prefix]
    if isinstance(document, dict):
        for key, value in document.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(document, list):
        for index, value in enumerate(document):
            out += _paths(value, (*prefix, index))
    return out


@st.composite
def mutated(draw: st.DrawFn, document: Any, max_mutations: int = 4) -> Any:
    """``document`` with up to ``max_mutations`` random replacements, deletions and additions."""
    document = copy.deepcopy(document)
    for _ in range(draw(st.integers(1, max_mutations))):
        paths = _paths(document)
        path = draw(st.sampled_from(paths))
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if not path:
            if action == "replace":
                document = draw(values)
            continue
        parent = document
        for step in path[:-1]:
            parent = parent[step]
        last = path[-1]
        if action == "replace":
            parent[last] = draw(values)
        elif action == "delete":
            del parent[last]
        else:
            target = parent[last]
            if isinstance(target, dict):
                target[draw(_names)] = draw(values)
            elif isinstance(target, list):
                target.append(draw(values))
            else:
                parent[last] = [target, draw(values)]
    return document


def _toml_safe(value: Any) -> Any:
    """Drop what TOML cannot hold (None, mixed-type keys); TOML needs a table at the top."""
    if isinstance(value, dict):
        return {str(k): _toml_safe(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_toml_safe(v) for v in value if v is not None]
    return value


def to_toml(document: Any) -> str:
    if not isinstance(document, dict):
        document = {"value": document}
    try:
        return tomli_w.dumps(_toml_safe(document))
    except (TypeError, ValueError):  # something TOML cannot represent: give the parser the repr instead
        return repr(document)


def _workdir() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="omopfl-fuzz-"))
    (folder / "omop.duckdb").write_bytes(b"")
    return folder


_WORKDIR: list[Path] = []


def workdir() -> Path:
    """One scratch folder per process (parsers read files; they never write)."""
    if not _WORKDIR:
        _WORKDIR.append(_workdir())
    return _WORKDIR[0]


def _expect_parsed_or_own_error(parse: Callable[[], Any], kind: type) -> str:
    try:
        result = parse()
    except OmopflError as exc:
        message = str(exc)
        assert message and "\n" not in message, f"error is not one line: {message!r}"
        return "refused"
    assert isinstance(result, kind), type(result)
    return "parsed"


# ----------------------------------------------------------------------------------------- targets
def check_adapter(text: str | bytes) -> str:
    path = workdir() / "site.toml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    return _expect_parsed_or_own_error(lambda: load_site(path), SiteConfig)


def good_study() -> dict[str, Any]:
    import tomllib

    document = tomllib.loads((ROOT / "examples" / "t2dm_hf" / "study.toml").read_text())
    document["cohorts"] = {"target": str(COHORTS / "incident_t2dm.yaml"),
                           "outcome": str(COHORTS / "heart_failure.yaml")}
    document.setdefault("privacy", {"statistics_epsilon": 1.0, "delta": 1e-6, "bounds": {"age": [0, 120]}})
    return document


def check_study(text: str | bytes) -> str:
    path = workdir() / "study.toml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    return _expect_parsed_or_own_error(lambda: load_study(path), StudyConfig)


def good_cohort_yaml() -> dict[str, Any]:
    return yaml.safe_load((COHORTS / "incident_t2dm.yaml").read_text())


def good_cohort_json() -> dict[str, Any]:
    text = (COHORTS / "incident_t2dm.yaml").read_text()
    name, expression, cohort_id = yaml_to_circe(text, "incident_t2dm.yaml")
    return {"id": cohort_id, "name": name, "expression": expression}


def check_cohort_json(text: str) -> str:
    return _expect_parsed_or_own_error(lambda: parse_definition(text, "fuzz.json"), CohortDefinition)


def check_cohort_yaml(text: str) -> str:
    return _expect_parsed_or_own_error(lambda: parse_definition(text, "fuzz.yaml"), CohortDefinition)


def json_text(document: Any) -> str:
    return json.dumps(document, allow_nan=True)


def yaml_text(document: Any) -> str:
    return yaml.safe_dump(document, allow_unicode=True)


# ----------------------------------------------------------------------------------------- strategies
adapter_inputs = st.one_of(mutated(GOOD_ADAPTER).map(to_toml), st.text(max_size=200), st.binary(max_size=100))
study_inputs = st.one_of(mutated(good_study()).map(to_toml), st.text(max_size=200), st.binary(max_size=60))
cohort_json_inputs = st.one_of(mutated(good_cohort_json(), 5).map(json_text),
                               mutated(good_cohort_json()["expression"], 5).map(json_text),
                               st.text(max_size=200),
                               st.integers(1, 3000).map(lambda n: "[" * n + "]" * n),
                               st.integers(1, 3000).map(lambda n: '{"a":' * n + "1" + "}" * n))
cohort_yaml_inputs = st.one_of(mutated(good_cohort_yaml(), 5).map(yaml_text), st.text(max_size=200),
                               st.integers(1, 120).map(lambda n: "[" * n + "]" * n))  # PyYAML is slow on depth

TARGETS: dict[str, tuple[st.SearchStrategy, Callable[[Any], str]]] = {
    "adapter": (adapter_inputs, check_adapter),
    "study": (study_inputs, check_study),
    "cohort_json": (cohort_json_inputs, check_cohort_json),
    "cohort_yaml": (cohort_yaml_inputs, check_cohort_yaml),
}
