"""Federated statistics with real Flower: codec, the site's handler, the server, and whole runs.

Three synthetic sites are generated and prepared on DuckDB (imaging and omics off), plus a
fourth site of 7 persons with ``min_cell_count = 10``, which must withhold.  The global mean and
std of a run must equal numpy over the pooled prepared data of the sites and features that were
released, and everything a site sends must pass the allow-list: known record names and keys,
one entry per feature, counts of at least the site's minimum cell count, no person id, no path.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import run_omopfl
from flwr.app import Context, RecordDict

from omopfl import policy
from omopfl.config import load_site
from omopfl.errors import SiteFailure
from omopfl.federation import codec, flower_internals
from omopfl.federation.local import run_stats
from omopfl.federation.site.app import app as client_app
from omopfl.federation.site.statistics import SCALER_FILE, site_statistics
from omopfl.moments import Moments, Scaler
from omopfl.prepare import load_prepared
from omopfl.study import load_study
from omopfl.suppression import binary_columns, suppress

ROOT = Path(__file__).resolve().parents[1]
SITES = ("site_a", "site_b", "site_c")
TINY = "site_tiny"

@pytest.fixture(scope="module")
def federation(prepared_sites_factory) -> dict[str, Any]:
    """Three prepared synthetic sites and a 7-person site, with their adapters."""
    federation = prepared_sites_factory("federation")
    tmp, prepared_dir, adapters = federation["tmp"], federation["prepared_dir"], federation["adapters"]
    # a site of 7 persons (rows of site_a's dataset) whose adapter sets min_cell_count = 10
    source = prepared_dir / "site_a"
    tiny = prepared_dir / TINY
    tiny.mkdir()
    with np.load(source / "tabular.npz") as data:
        np.savez(tiny / "tabular.npz", x=data["x"][:7], y=data["y"][:7], feature_names=data["feature_names"])
    np.save(tiny / "persons.npy", np.load(source / "persons.npy")[:7])
    manifest = json.loads((source / "manifest.json").read_text())
    manifest.update(site=TINY, persons=7)
    (tiny / "manifest.json").write_text(json.dumps(manifest))
    tiny_adapter = tmp / "synth" / "adapters" / f"{TINY}.toml"
    tiny_adapter.write_text(f'[site]\nname = "{TINY}"\nmin_cell_count = 10\n\n[database]\n'
                            'duckdb_path = "nowhere/omop.duckdb"\ncdm_schema = "cdm"\nresults_schema = "results"\n')
    adapters.append(tiny_adapter)
    policy.approve(load_site(tiny_adapter), load_study(federation["study"]))
    return federation


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _wire(content: RecordDict) -> RecordDict:
    """What arrives on the other side: Flower's protobuf serialization and back."""
    return flower_internals.recorddict_from_bytes(flower_internals.recorddict_to_bytes(content))


def _numbers(value: Any) -> list[float]:
    if isinstance(value, list):
        return [v for item in value for v in _numbers(item)]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return [value]
    return []


def _strings(value: Any) -> list[str]:
    if isinstance(value, list):
        return [v for item in value for v in _strings(item)]
    return [value] if isinstance(value, str) else []


def assert_safe_reply(plain: dict[str, dict[str, Any]], *, site: str, min_cell_count: int,
                      feature_names: list[str], person_ids: np.ndarray | None = None) -> None:
    """A site's reply (as plain data) holds only allowed aggregates over >= min_cell_count persons."""
    assert set(plain) <= set(codec.REPLY_KEYS), plain.keys()
    for name, record in plain.items():
        assert set(record) <= codec.REPLY_KEYS[name], (name, record.keys())
    meta = plain["omopfl.site"]
    assert meta["site"] == site and meta["protocol"] == codec.PROTOCOL
    assert meta["status"] in {"ok", "withheld", "error"}
    # the only strings: the site's name, the status/code and the study's feature names; no paths
    strings = _strings(list(meta.values()))
    assert set(strings) <= {site, meta["status"], meta["code"], "", *feature_names}
    assert not any("/" in s or "\\" in s for s in strings)
    if meta["status"] == "error":
        assert meta["code"] in codec.ERROR_CODES and set(meta) == {"protocol", "site", "status", "code"}
        return
    if "feature-names" not in meta:  # acknowledgement of the scaler
        assert meta["status"] == "ok" and "omopfl.moments" not in plain
        return
    assert meta["feature-names"] == feature_names
    if meta["status"] == "withheld":
        assert "omopfl.moments" not in plain  # not even the person count
        return
    moments = plain["omopfl.moments"]
    k = len(feature_names)
    assert len(moments["released"]) == k and set(moments["released"]) <= {0, 1}
    r = sum(moments["released"])
    assert len(moments["n"]) == len(moments["mean"]) == len(moments["m2"]) == r
    assert moments["persons"] >= min_cell_count
    assert all(n >= min_cell_count for n in moments["n"])
    assert all(np.isfinite(moments["mean"])) and all(m >= 0 for m in moments["m2"])
    if person_ids is not None:  # no person id anywhere among the numbers
        assert not set(_numbers(list(moments.values()))) & {float(p) for p in person_ids}


def _released_pooled(federation: dict[str, Any]) -> tuple[list[str], np.ndarray, np.ndarray, int]:
    """numpy mean/std (ddof=1) per feature over the pooled rows of the sites that release it."""
    columns: list[list[np.ndarray]] = []
    persons = 0
    names: list[str] = []
    for adapter in federation["adapters"]:
        site = load_site(adapter)
        prepared = load_prepared(federation["prepared_dir"] / site.name)
        names = prepared.feature_names
        if not columns:
            columns = [[] for _ in names]
        if prepared.n < site.min_cell_count:
            continue
        persons += prepared.n
        x = prepared.x.astype(np.float64)
        k = site.min_cell_count
        for j in range(len(names)):
            values = x[~np.isnan(x[:, j]), j]
            ones = int(np.count_nonzero(values == 1))
            is_binary = bool(np.all((values == 0) | (values == 1)))
            if (len(values) >= k and not 0 < prepared.n - len(values) < k
                    and not (is_binary and (0 < ones < k or 0 < len(values) - ones < k))):
                columns[j].append(x[:, j])
    pooled = [np.concatenate(c) for c in columns]
    mean = np.array([np.nanmean(c) for c in pooled])
    std = np.array([np.nanstd(c, ddof=1) for c in pooled])
    return names, mean, std, persons


def _check_run(result: dict[str, Any], federation: dict[str, Any], audit: Path) -> None:
    names, mean, std, persons = _released_pooled(federation)
    assert result["sites"]["contributing"] == list(SITES)
    assert result["sites"]["withheld"] == [TINY]  # named, and the run carried on with the rest
    assert result["sites"]["failed"] == [] and result["sites"]["no_reply"] == []
    g = result["global"]
    assert g["feature_names"] == names and g["persons"] == persons
    np.testing.assert_allclose(np.array(g["mean"], dtype=float), mean, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.array(g["std"], dtype=float), std, rtol=1e-9, atol=1e-12)
    # the scaler went back to every site, withheld ones too, and each kept it
    assert sorted(result["sites"]["scaler_acknowledged"]) == sorted([*SITES, TINY])
    scaler = codec.GlobalScaler.from_dict(result["scaler"])
    np.testing.assert_allclose(scaler.scaler.mean, mean, rtol=1e-9, atol=1e-12)
    assert scaler.study_hash == federation["study_hash"]
    assert scaler.indicator == tuple(n.endswith("__missing") for n in names)
    for site in [*SITES, TINY]:
        kept = json.loads((federation["prepared_dir"] / site / SCALER_FILE).read_text())
        assert kept == result["scaler"]
    # every message a site sent, as the server received it
    replies = json.loads(audit.read_text())["replies"]
    assert len(replies) == 2 * (len(SITES) + 1)
    for reply in replies:
        assert "content" in reply, reply  # no Flower-level error
        site = reply["content"]["omopfl.site"]["site"]
        prepared = federation["prepared_dir"] / site
        assert_safe_reply(reply["content"], site=site, min_cell_count=10, feature_names=names,
                          person_ids=np.load(prepared / "persons.npy"))
        if site == TINY and reply["message_type"] == codec.STATS_QUERY:
            assert reply["content"]["omopfl.site"]["status"] == "withheld"


# --------------------------------------------------------------------------------------------
# codec
# --------------------------------------------------------------------------------------------


def test_codec_round_trips_through_flower_serialization() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(50, 10, size=(40, 3))
    x[:35, 2] = np.nan  # 5 values: withheld with k = 10
    names = ["age", "bmi", "ldl"]
    released = suppress(Moments.from_array(x, names), 10)
    assert released.released == (True, True, False)
    reply = codec.decode_site_reply(_wire(codec.encode_site_stats("site_x", released)))
    assert reply.site == "site_x" and reply.status == "ok" and reply.released == released

    withheld = suppress(Moments.from_array(x[:7], names), 10)
    content = _wire(codec.encode_site_stats("site_x", withheld))
    assert set(content.keys()) == {"omopfl.site"}  # no numbers at all, not even the count
    assert codec.decode_site_reply(content).status == "withheld"

    error = codec.decode_site_reply(_wire(codec.encode_error("site_x", "not_prepared")))
    assert (error.status, error.code, error.released) == ("error", "not_prepared", None)
    assert codec.decode_site_reply(_wire(codec.encode_error(None, "no such code"))).code == "internal"

    scaler = codec.GlobalScaler.build(Scaler(("a", "a__missing"), np.array([1.5, 0.25]), np.array([2.0, 1.0])),
                                      [30, 40], 40, "ab12")
    back = codec.decode_scaler(_wire(codec.encode_scaler(scaler)))
    assert back.scaler == scaler.scaler and back.indicator == (False, True) and list(back.n) == [30, 40]

    dp = codec.DPRequest(1.0, 1e-6, {"age": (0.0, 120.0)})
    request = codec.decode_stats_request(_wire(codec.encode_stats_request("ab12", dp)))
    assert request.study_hash == "ab12" and request.dp == dp


def test_codec_rejects_anything_outside_the_allow_list() -> None:
    released = suppress(Moments.from_array(np.arange(30.0).reshape(15, 2), ["a", "b"]), 10)
    good = codec.encode_site_stats("site_x", released)
    extra_key = _wire(good)
    extra_key.config_records["omopfl.site"]["person_id"] = [1, 2, 3]
    extra_record = _wire(good)
    extra_record["debug"] = extra_key.config_records["omopfl.site"]
    error_with_text = codec.encode_error("site_x", "internal")
    error_with_text.config_records["omopfl.site"]["code"] = "ValueError: patient 123 has ..."
    for bad in (extra_key, extra_record, error_with_text):
        with pytest.raises(codec.CodecError) as info:
            codec.decode_site_reply(bad)
        assert "123" not in str(info.value)
    with pytest.raises(TypeError):
        codec.encode_site_stats("site_x", Moments.from_array(np.ones((12, 1)), ["a"]))  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# the site's handler as a plain function
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("min_cell_count", [10, 45])
def test_site_statistics_release_only_aggregates_over_the_min_cell_count(federation, min_cell_count) -> None:
    for name in (*SITES, TINY):
        prepared = load_prepared(federation["prepared_dir"] / name)
        content = _wire(site_statistics(prepared, min_cell_count))
        plain = codec.to_plain(content)
        assert_safe_reply(plain, site=name, min_cell_count=min_cell_count, feature_names=prepared.feature_names,
                          person_ids=np.load(federation["prepared_dir"] / name / "persons.npy"))
        reply = codec.decode_site_reply(content)
        if prepared.n < min_cell_count:
            assert reply.status == "withheld" and reply.released is None
            continue
        exact = Moments.from_array(prepared.x, prepared.feature_names)
        assert reply.released == suppress(exact, min_cell_count, binary=binary_columns(prepared.x))
        # independently of omopfl.stats: every released feature covers >= k persons, is missing in 0 or
        # >= k persons, and (if 0/1) has 0 or >= k ones and zeros; so no small cell by differencing
        k = min_cell_count
        for j, flag in enumerate(reply.released.released):
            column = prepared.x[:, j]
            values = column[~np.isnan(column)]
            ones = int(np.count_nonzero(values == 1))
            is_binary = bool(np.all((values == 0) | (values == 1)))
            safe = (len(values) >= k and (prepared.n - len(values) in range(1, k)) is False
                    and not (is_binary and (0 < ones < k or 0 < len(values) - ones < k)))
            assert flag == safe, prepared.feature_names[j]
    # with k = 45 the smallest site releases some features and withholds the rest
    smallest = load_prepared(federation["prepared_dir"] / "site_c")
    if min_cell_count == 45:
        assert smallest.n >= 45
        released = codec.decode_site_reply(_wire(site_statistics(smallest, 45))).released
        assert released is not None and 0 < sum(released.released) < len(smallest.feature_names)


def test_site_statistics_with_differential_privacy(federation) -> None:
    prepared = load_prepared(federation["prepared_dir"] / "site_a")
    bounds = {name: (0.0, 1.0) for name in prepared.feature_names}
    bounds.update(age=(18.0, 100.0), prior_observation_days=(0.0, 10000.0), statin_prescriptions=(0.0, 20.0),
                  hba1c=(3.0, 20.0), glucose=(20.0, 1000.0), creatinine=(0.1, 20.0), ldl=(10.0, 500.0),
                  bmi=(10.0, 80.0), systolic_bp=(50.0, 280.0))
    dp = codec.DPRequest(2.0, 1e-6, bounds)
    content = _wire(site_statistics(prepared, 10, dp, rng=np.random.default_rng(1)))
    assert_safe_reply(codec.to_plain(content), site="site_a", min_cell_count=0, feature_names=prepared.feature_names)
    reply = codec.decode_site_reply(content)
    assert reply.dp == (2.0, 1e-6)
    exact = suppress(Moments.from_array(prepared.x, prepared.feature_names), 10, binary=binary_columns(prepared.x))
    assert reply.released.released == exact.released  # withholding is decided on the true counts
    assert not np.array_equal(reply.released.mean, exact.mean)  # the numbers are noisy
    assert np.all(np.abs(reply.released.mean - exact.mean) <= np.array([b[1] - b[0] for b in bounds.values()]))
    del bounds["bmi"]
    with pytest.raises(SiteFailure) as info:
        site_statistics(prepared, 10, codec.DPRequest(2.0, 1e-6, bounds))
    assert info.value.code == "dp_bounds"


# --------------------------------------------------------------------------------------------
# the ClientApp itself: failures reply with a code, never with exception text
# --------------------------------------------------------------------------------------------


def _call(node_config: dict[str, Any], content: RecordDict, message_type: str = codec.STATS_QUERY):
    """The site's ClientApp object on a message as its SuperNode delivers it."""
    context = Context(run_id=7, node_id=42, node_config=node_config, state=RecordDict(), run_config={})
    with flower_internals.superlink_task_identity(7, 1):
        message = flower_internals.delivered_message(content, dst_node_id=42, message_type=message_type,
                                                     message_id="m1", run_id=7)
        reply = client_app(message, context)
    assert not reply.has_error()
    return codec.decode_site_reply(_wire(reply.content)), codec.to_plain(reply.content), context


def test_client_app_replies_with_fixed_error_codes(federation, monkeypatch, tmp_path: Path) -> None:
    adapter = str(federation["adapters"][0])
    prepared_dir = str(federation["prepared_dir"])
    request = codec.encode_stats_request(federation["study_hash"])
    ok, _, _ = _call({"site-config": adapter, "prepared-dir": prepared_dir}, request)
    assert ok.status == "ok" and ok.site == "site_a"

    cases = {
        "config": ({"site-config": str(tmp_path / "missing.toml"), "prepared-dir": prepared_dir}, request),
        "not_prepared": ({"site-config": adapter, "prepared-dir": str(tmp_path)}, request),
        "study_not_approved": ({"site-config": adapter, "prepared-dir": prepared_dir},
                               codec.encode_stats_request("0" * 64)),
        "bad_request": ({"site-config": adapter, "prepared-dir": prepared_dir}, RecordDict()),
    }
    for code, (node_config, content) in cases.items():
        reply, plain, _ = _call(node_config, content)
        assert (reply.status, reply.code) == ("error", code), code
        assert set(plain) == {"omopfl.site"} and set(plain["omopfl.site"]) == {"protocol", "site", "status", "code"}
    # an unexpected exception inside: the reply says "internal", not what happened
    broken = tmp_path / "prepared"
    (broken / "site_a").mkdir(parents=True)
    (broken / "site_a" / "manifest.json").write_text(json.dumps({"format_version": 1, "site": "site_a",
                                                                 "study_hash": federation["study_hash"]}))
    (broken / "site_a" / "tabular.npz").write_bytes(b"patient 12345 secret")
    reply, plain, _ = _call({"site-config": adapter, "prepared-dir": str(broken)}, request)
    assert (reply.status, reply.code) == ("error", "internal")
    assert "12345" not in json.dumps(plain) and str(broken) not in json.dumps(plain)


def test_client_app_keeps_the_scaler_and_refuses_a_mismatched_one(federation, monkeypatch) -> None:
    node_config = {"site-config": str(federation["adapters"][1]), "prepared-dir": str(federation["prepared_dir"])}
    prepared = load_prepared(federation["prepared_dir"] / "site_b")
    k = len(prepared.feature_names)
    scaler = codec.GlobalScaler.build(Scaler(tuple(prepared.feature_names), np.zeros(k), np.ones(k)), [1] * k, 1,
                                      federation["study_hash"])
    reply, _, context = _call(node_config, codec.encode_scaler(scaler), codec.SCALER_QUERY)
    assert (reply.site, reply.status) == ("site_b", "ok")
    assert codec.decode_scaler(context.state).scaler == scaler.scaler  # kept for a training phase
    assert json.loads((federation["prepared_dir"] / "site_b" / SCALER_FILE).read_text()) == scaler.to_dict()
    wrong = codec.GlobalScaler.build(Scaler(("other",), np.zeros(1), np.ones(1)), [1], 1, federation["study_hash"])
    reply, _, _ = _call(node_config, codec.encode_scaler(wrong), codec.SCALER_QUERY)
    assert (reply.status, reply.code) == ("error", "feature_mismatch")


# --------------------------------------------------------------------------------------------
# the server side imports nothing that touches patient data
# --------------------------------------------------------------------------------------------

FORBIDDEN = ("omopfl.prepare", "omopfl.features", "omopfl.linking", "omopfl.db", "omopfl.cohort", "omopfl.synth",
             "omopfl.validation", "omopfl.conformance", "omopfl.expectations", "omopfl.sites", "omopfl.eunomia",
             "omopfl.config", "omopfl.federation.site.statistics", "omopfl.federation.local", "sqlalchemy", "duckdb",
             "psycopg", "psycopg2", "pydicom", "great_expectations", "torch")


COORDINATOR = sorted(p.stem for p in (ROOT / "omopfl" / "federation" / "coordinator").glob("*.py")
                     if p.stem != "__init__")


@pytest.mark.parametrize("module", COORDINATOR)
def test_coordinator_modules_import_no_patient_data_code(module: str) -> None:
    """No coordinator module imports (at any level, function-local imports included) code that reads patient
    data or the site side, and importing it loads none of that.  (The training ServerApp builds the initial
    model through omopfl.models, which loads torch, only when it runs.)"""
    assert len(COORDINATOR) >= 9
    tree = ast.parse((ROOT / "omopfl" / "federation" / "coordinator" / f"{module}.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    bad = [m for m in imported if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]
    assert not bad, bad
    code = (f"import json, sys; import omopfl.federation.coordinator.{module}; "
            "print(json.dumps(sorted(sys.modules)))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                       text=True).stdout)
    bad = [m for m in loaded if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]
    assert not bad, bad


# --------------------------------------------------------------------------------------------
# whole runs
# --------------------------------------------------------------------------------------------


def test_inprocess_run_matches_numpy_on_the_pooled_data(federation) -> None:
    out, audit = federation["tmp"] / "inprocess.json", federation["tmp"] / "inprocess_audit.json"
    result = run_stats(federation["study"], federation["adapters"], federation["prepared_dir"], mode="inprocess",
                       out=out, audit=audit)
    assert json.loads(out.read_text()) == result
    assert result["runner"]["engine"].startswith("inprocess")
    _check_run(result, federation, audit)


@pytest.mark.slow
def test_default_run_uses_real_flower_processes(federation) -> None:
    """The default mode: Flower's Simulation Engine needs ray, so a loopback SuperLink + 4 SuperNodes run."""
    out, audit = federation["tmp"] / "deployment.json", federation["tmp"] / "deployment_audit.json"
    for site in (*SITES, TINY):
        (federation["prepared_dir"] / site / SCALER_FILE).unlink(missing_ok=True)
    result = run_stats(federation["study"], federation["adapters"], federation["prepared_dir"], out=out, audit=audit,
                       timeout=240)
    assert result["runner"]["engine"] == "deployment (loopback SuperLink + SuperNodes)"
    if not result["runner"]["note"]:
        pytest.fail("mode 'simulation' ran without a note on the engine used")
    _check_run(result, federation, audit)
    print(json.dumps({"runner": result["runner"], "server_seconds": result["seconds"]}))


def test_cli_stats_prints_numpy_pooled_mean_and_std(federation, capsys) -> None:
    """`omopfl stats --json` on three synthetic sites (+ one that withholds) equals numpy on the pooled data."""

    args = ["stats", "--study", str(federation["study"]), "--prepared", str(federation["prepared_dir"]),
            "--out", str(federation["tmp"] / "cli.json"), "--mode", "inprocess", "--json"]
    for adapter in federation["adapters"]:
        args += ["--site", str(adapter)]
    code = run_omopfl(args)
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    names, mean, std, persons = _released_pooled(federation)
    merged = result["global"]
    assert merged["feature_names"] == names and merged["persons"] == persons
    np.testing.assert_allclose(merged["mean"], mean, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(merged["std"], std, rtol=1e-9, atol=1e-12)
    assert result["sites"]["withheld"] == ["site_tiny"]
