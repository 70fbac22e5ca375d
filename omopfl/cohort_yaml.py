"""A short YAML form for hand-written cohorts, translated to the OHDSI CIRCE model.

Everything here becomes a plain CIRCE expression, so a YAML cohort builds with the same
translator, SQL and attrition as an ATLAS export.  Example::

    id: 101
    name: Incident type 2 diabetes with 365 days of prior observation
    concept_sets:
      t2dm:
        - {concept_id: 201826, descendants: true}
      t1dm:
        - {concept_id: 201254, descendants: true}
    entry:
      events:
        - {condition_occurrence: t2dm, first: true}
      prior_observation_days: 365
      limit: first                       # first | all | last
    inclusion_rules:
      - name: no type 1 diabetes before index
        exclude: {condition_occurrence: t1dm, window: [all, 0]}
      - name: adults
        age: {min: 18}
    exit: {days_after_start: 365}        # or {end_of_observation: true} or {era: {drug_exposure: set, gap_days: 30}}
    collapse_days: 0

Domains: condition_occurrence, condition_era, drug_exposure, drug_era, procedure_occurrence,
measurement, observation, visit_occurrence, device_exposure, death.  A window is
``[start, end]`` in days relative to the index date; ``all`` means unbounded.
"""

from __future__ import annotations

from typing import Any

import yaml

from omopfl.errors import DataError

__all__ = ["yaml_to_circe", "DOMAINS"]

DOMAINS: dict[str, str] = {
    "condition_occurrence": "ConditionOccurrence",
    "condition_era": "ConditionEra",
    "drug_exposure": "DrugExposure",
    "drug_era": "DrugEra",
    "procedure_occurrence": "ProcedureOccurrence",
    "measurement": "Measurement",
    "observation": "Observation",
    "visit_occurrence": "VisitOccurrence",
    "device_exposure": "DeviceExposure",
    "death": "Death",
}
_OPS = {"gte": "gte", "gt": "gt", "lte": "lte", "lt": "lt", "eq": "eq"}
MAX_INT = 2**31 - 1  # ids and counts are 32-bit integers in OMOP and CIRCE
MAX_DAYS = 100_000  # about 270 years: any window, offset or gap beyond this is a typo


class _Reader:
    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, key: str, problem: str) -> DataError:
        return DataError(f"{self.where}: {key}: {problem}")

    def mapping(self, value: Any, key: str, allowed: set[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key, "must be a mapping")
        unknown = sorted(str(k) for k in value if k not in allowed)
        if unknown:
            raise self.fail(key, f"unknown key {unknown[0][:40]!r}; expected one of {', '.join(sorted(allowed))}")
        return value

    def integer(self, value: Any, key: str, minimum: int | None = None, maximum: int = MAX_INT) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, "must be an integer")
        if minimum is not None and value < minimum:
            raise self.fail(key, f"must be at least {minimum}")
        if value > maximum:
            raise self.fail(key, f"must be at most {maximum}")
        return value

    def days(self, value: Any, key: str, minimum: int | None = None) -> int:
        number = self.integer(value, key, minimum, MAX_DAYS)
        if number < -MAX_DAYS:
            raise self.fail(key, f"must be at least {-MAX_DAYS}")
        return number

    def text(self, value: Any, key: str) -> str:
        if not isinstance(value, str):
            raise self.fail(key, "must be a string")
        return value


def _concept_sets(reader: _Reader, raw: Any) -> tuple[list[dict[str, Any]], dict[str, int]]:
    if not isinstance(raw, dict) or not raw:
        raise reader.fail("concept_sets", "must map names to lists of concepts")
    sets, ids = [], {}
    for index, (name, items) in enumerate(raw.items()):
        if not isinstance(name, str) or not name:
            raise reader.fail(f"concept_sets.{str(name)[:40]}", "a concept set name must be a non-empty string")
        key = f"concept_sets.{name}"
        if not isinstance(items, list) or not items:
            raise reader.fail(key, "must be a non-empty list of {concept_id: N, descendants: bool, exclude: bool}")
        circe_items = []
        for j, item in enumerate(items):
            if isinstance(item, int) and not isinstance(item, bool):
                item = {"concept_id": item}
            item = reader.mapping(item, f"{key}[{j}]", {"concept_id", "descendants", "exclude", "mapped", "name"})
            concept_id = reader.integer(item.get("concept_id"), f"{key}[{j}].concept_id", minimum=1)
            circe_items.append({
                "concept": {"CONCEPT_ID": concept_id, "CONCEPT_NAME": str(item.get("name", ""))},
                "isExcluded": _flag(reader, item, "exclude", f"{key}[{j}]"),
                "includeDescendants": _flag(reader, item, "descendants", f"{key}[{j}]"),
                "includeMapped": _flag(reader, item, "mapped", f"{key}[{j}]"),
            })
        sets.append({"id": index, "name": str(name), "expression": {"items": circe_items}})
        ids[str(name)] = index
    return sets, ids


def _flag(reader: _Reader, item: dict[str, Any], key: str, where: str) -> bool:
    value = item.get(key, False)
    if not isinstance(value, bool):
        raise reader.fail(f"{where}.{key}", "must be true or false")
    return value


def _criterion(reader: _Reader, raw: Any, key: str, ids: dict[str, int], extra: set[str]) -> tuple[dict, dict]:
    """One ``{domain: concept_set, first: bool, value: {...}}`` entry -> CIRCE criterion (+ leftover keys)."""
    if not isinstance(raw, dict):
        raise reader.fail(key, "must be a mapping like {condition_occurrence: <concept set>}")
    domains = [k for k in raw if k in DOMAINS]
    if len(domains) != 1:
        raise reader.fail(key, f"needs exactly one domain key out of {', '.join(DOMAINS)}")
    allowed = {domains[0], "first", "value", *extra}
    reader.mapping(raw, key, allowed)
    domain = domains[0]
    set_name = raw[domain]
    body: dict[str, Any] = {}
    if domain != "death" or set_name is not None:
        if not isinstance(set_name, str) or set_name not in ids:
            raise reader.fail(f"{key}.{domain}", f"unknown concept set {str(set_name)[:40]!r}; "
                              "name one of concept_sets")
        body["CodesetId"] = ids[set_name]
    if _flag(reader, raw, "first", key):
        body["First"] = True
    if "value" in raw:
        value = reader.mapping(raw["value"], f"{key}.value", set(_OPS))
        if len(value) != 1:
            raise reader.fail(f"{key}.value", "give one comparison, e.g. {gte: 7}")
        ((op, number),) = value.items()
        if isinstance(number, bool) or not isinstance(number, int | float) or not abs(number) <= 1e15:
            raise reader.fail(f"{key}.value.{op}", "must be a finite number")
        body["ValueAsNumber"] = {"Value": number, "Op": _OPS[op]}
    return {DOMAINS[domain]: body}, {k: raw[k] for k in extra if k in raw}


def _window(reader: _Reader, raw: Any, key: str) -> dict[str, Any]:
    if raw is None:
        raw = ["all", 0]
    if not isinstance(raw, list) or len(raw) != 2:
        raise reader.fail(key, "must be [start, end] in days from index (negative = before; 'all' = unbounded)")

    def bound(value: Any, side: str, default_coeff: int) -> dict[str, Any]:
        if value == "all":
            return {"Coeff": default_coeff}
        number = reader.days(value, f"{key}.{side}")
        return {"Days": abs(number), "Coeff": -1 if number < 0 else 1}

    start, end = bound(raw[0], "start", -1), bound(raw[1], "end", 1)
    if "Days" in start and "Days" in end and start["Days"] * start["Coeff"] > end["Days"] * end["Coeff"]:
        raise reader.fail(key, "start must not be after end")
    return {"Start": start, "End": end}


def _inclusion_rule(reader: _Reader, raw: Any, index: int, ids: dict[str, int]) -> dict[str, Any]:
    key = f"inclusion_rules[{index}]"
    rule = reader.mapping(raw, key, {"name", "description", "require", "exclude", "age", "gender"})
    if not isinstance(rule.get("name"), str):
        raise reader.fail(f"{key}.name", "every inclusion rule needs a name")
    criteria, demographics = [], []
    for mode in ("require", "exclude"):
        if mode not in rule:
            continue
        criterion, extra = _criterion(reader, rule[mode], f"{key}.{mode}", ids, {"window", "at_least"})
        at_least = reader.integer(extra.get("at_least", 1), f"{key}.{mode}.at_least", minimum=1, maximum=100_000)
        occurrence = {"Type": 2, "Count": at_least} if mode == "require" else {"Type": 0, "Count": 0}
        criteria.append({
            "Criteria": criterion,
            "StartWindow": _window(reader, extra.get("window"), f"{key}.{mode}.window"),
            "Occurrence": occurrence,
            "RestrictVisit": False,
            "IgnoreObservationPeriod": False,
        })
    if "age" in rule:
        age = reader.mapping(rule["age"], f"{key}.age", {"min", "max"})
        low, high = age.get("min"), age.get("max")
        if low is not None:
            low = reader.integer(low, f"{key}.age.min", minimum=0, maximum=200)
        if high is not None:
            high = reader.integer(high, f"{key}.age.max", minimum=0, maximum=200)
        if low is not None and high is not None:
            if low > high:
                raise reader.fail(f"{key}.age", "min must not be above max")
            demographics.append({"Age": {"Value": low, "Extent": high, "Op": "bt"}})
        elif low is not None:
            demographics.append({"Age": {"Value": low, "Op": "gte"}})
        elif high is not None:
            demographics.append({"Age": {"Value": high, "Op": "lte"}})
        else:
            raise reader.fail(f"{key}.age", "give min, max or both")
    if "gender" in rule:
        genders = rule["gender"] if isinstance(rule["gender"], list) else [rule["gender"]]
        if not genders:
            raise reader.fail(f"{key}.gender", "must list at least one gender concept id")
        demographics.append({"Gender": [{"CONCEPT_ID": reader.integer(g, f"{key}.gender", minimum=1)}
                                        for g in genders]})
    if not criteria and not demographics:
        raise reader.fail(key, "needs one of require, exclude, age or gender")
    return {
        "name": rule["name"],
        "description": reader.text(rule.get("description", ""), f"{key}.description"),
        "expression": {"Type": "ALL", "CriteriaList": criteria, "DemographicCriteriaList": demographics,
                       "Groups": []},
    }


def _limit(reader: _Reader, value: Any, key: str) -> dict[str, str]:
    names = {"first": "First", "all": "All", "last": "Last"}
    if not isinstance(value, str) or value not in names:
        raise reader.fail(key, "must be first, all or last")
    return {"Type": names[value]}


def _exit(reader: _Reader, raw: Any, ids: dict[str, int]) -> dict[str, Any] | None:
    if raw is None:
        return None
    rule = reader.mapping(raw, "exit", {"end_of_observation", "days_after_start", "days_after_end", "era"})
    if len(rule) != 1:
        raise reader.fail("exit", "give exactly one of end_of_observation, days_after_start, days_after_end, era")
    ((kind, value),) = rule.items()
    if kind == "end_of_observation":
        if value is not True:
            raise reader.fail("exit.end_of_observation", "must be true")
        return None
    if kind in {"days_after_start", "days_after_end"}:
        days = reader.days(value, f"exit.{kind}", minimum=0)
        field = "StartDate" if kind == "days_after_start" else "EndDate"
        return {"DateOffset": {"DateField": field, "Offset": days}}
    era = reader.mapping(value, "exit.era", {"drug_exposure", "gap_days", "offset_days"})
    if not isinstance(era.get("drug_exposure"), str) or era["drug_exposure"] not in ids:
        raise reader.fail("exit.era.drug_exposure", "must name a concept set of drugs")
    return {"CustomEra": {
        "DrugCodesetId": ids[era["drug_exposure"]],
        "GapDays": reader.days(era.get("gap_days", 30), "exit.era.gap_days", minimum=0),
        "Offset": reader.days(era.get("offset_days", 0), "exit.era.offset_days", minimum=0),
    }}


def yaml_to_circe(text: str, where: str) -> tuple[str, dict[str, Any], int | None]:
    """Parse the short YAML form; return ``(name, CIRCE expression, id or None)``.

    Raises
    ------
    DataError
        Naming the file and the key that is wrong.
    """
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise DataError(f"{where}: not valid YAML{at}") from None
    except (RecursionError, ValueError, TypeError):  # deep nesting; values PyYAML's constructors reject
        raise DataError(f"{where}: not valid YAML (too deeply nested or an unreadable value)") from None
    reader = _Reader(where)
    document = reader.mapping(
        document, "top level",
        {"id", "name", "description", "concept_sets", "entry", "inclusion_rules", "limit", "exit", "collapse_days",
         "censor"},
    )
    if not isinstance(document.get("name"), str) or not document["name"].strip():
        raise reader.fail("name", "is required (a short human-readable name)")
    if "description" in document:
        reader.text(document["description"], "description")
    cohort_id = reader.integer(document["id"], "id", minimum=1) if "id" in document else None
    concept_sets, ids = _concept_sets(reader, document.get("concept_sets"))
    entry = reader.mapping(document.get("entry"), "entry",
                           {"events", "prior_observation_days", "post_observation_days", "limit"})
    events = entry.get("events")
    if not isinstance(events, list) or not events:
        raise reader.fail("entry.events", "must list at least one entry event")
    criteria_list = [_criterion(reader, e, f"entry.events[{i}]", ids, set())[0] for i, e in enumerate(events)]
    rules = document.get("inclusion_rules") or []
    if not isinstance(rules, list):
        raise reader.fail("inclusion_rules", "must be a list")
    censor = document.get("censor") or []
    if not isinstance(censor, list):
        raise reader.fail("censor", "must be a list of events")
    expression: dict[str, Any] = {
        "ConceptSets": concept_sets,
        "PrimaryCriteria": {
            "CriteriaList": criteria_list,
            "ObservationWindow": {
                "PriorDays": reader.days(entry.get("prior_observation_days", 0), "entry.prior_observation_days", 0),
                "PostDays": reader.days(entry.get("post_observation_days", 0), "entry.post_observation_days", 0),
            },
            "PrimaryCriteriaLimit": _limit(reader, entry.get("limit", "first"), "entry.limit"),
        },
        "QualifiedLimit": _limit(reader, document.get("limit", "first"), "limit"),
        "ExpressionLimit": _limit(reader, document.get("limit", "first"), "limit"),
        "InclusionRules": [_inclusion_rule(reader, r, i, ids) for i, r in enumerate(rules)],
        "CensoringCriteria": [_criterion(reader, c, f"censor[{i}]", ids, set())[0] for i, c in enumerate(censor)],
        "CollapseSettings": {"CollapseType": "ERA",
                             "EraPad": reader.days(document.get("collapse_days", 0), "collapse_days", 0)},
        "CensorWindow": {},
        "cdmVersionRange": ">=5.0.0",
    }
    end_strategy = _exit(reader, document.get("exit"), ids)
    if end_strategy is not None:
        expression["EndStrategy"] = end_strategy
    return document["name"], expression, cohort_id
