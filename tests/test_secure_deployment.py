"""Secure aggregation (statistics and training updates) over Flower's Deployment Engine on loopback.

``omopfl server`` and three ``omopfl train --site`` processes (SuperLink, SuperNodes, the sites' workers),
started only through omopfl's commands, with a study that sets ``[privacy] secure_aggregation = true``:
the run finishes, its model equals the in-process secure run's, the coordinator's record of every train
reply holds only masked bytes, and each site's audit log lists one masked release per round.
Kept short (logistic model, 2 rounds, the small test sites).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import prepare_and_approve

from omopfl import audit
from omopfl.config import load_site
from omopfl.federation.processes import free_port
from omopfl.federation.site import audit_trail
from omopfl.study import load_study

pytestmark = pytest.mark.slow

SITES = ("site_a", "site_b", "site_c")


@pytest.fixture(scope="module")
def secure(prepared_sites_factory) -> dict[str, Any]:

    federation = prepared_sites_factory("secagg_deploy")
    study = federation["tmp"] / "study_secure.toml"
    study.write_text(federation["study"].read_text() + "\n[privacy]\nsecure_aggregation = true\n")
    spec = load_study(study)
    assert spec.model.kind == "logistic"
    prepared = federation["tmp"] / "prepared_secure"
    prepare_and_approve(federation["adapters"], spec, prepared)
    return {**federation, "study": study, "prepared_dir": prepared, "study_hash": spec.hash}


def _model(run_dir: Path) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO((run_dir / "model.npz").read_bytes())) as saved:
        return {k: saved[k] for k in saved.files}


def test_secure_aggregation_in_a_loopback_deployment(secure, tmp_path: Path) -> None:
    from test_deployment import _server_args, _site_args, _Started, _wait

    from omopfl.federation.local import run_training

    port = free_port()
    run_dir = tmp_path / "run"
    started = _Started(tmp_path)
    try:
        server = started.start("server", _server_args(secure, port, run_dir, "--rounds", "2", "--sites", "3",
                                                      "--min-sites", "3", "--audit"))
        for index in range(3):
            started.start(f"site_{index}", _site_args(secure, index, port))
        code = _wait(server, 300, started, "server")
    finally:
        started.stop_all()
    assert code == 0, started.log("server")[-4000:]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    print(json.dumps({"seconds": manifest["seconds"], "final": manifest["final"]}))
    assert manifest["sites"] == list(SITES) and manifest["dropped"] == []
    assert manifest["secure_aggregation"] == {"statistics": True, "training": True, "participants": list(SITES)}
    assert manifest["stats_sites"]["persons"] == {}  # no site's own count reached the coordinator
    # the coordinator's record: every train reply is a masked vector, no arrays, no train rows
    replies = json.loads((run_dir / "audit.json").read_text())["replies"]
    train = [r for r in replies if r["message_type"] == "train"]
    assert len(train) == 6
    assert all(set(r["content"]) <= {"omopfl.secagg", "evaluate"} and "omopfl.secagg" in r["content"] for r in train)
    # the same sites in process give the same model
    inprocess = run_training(secure["study"], secure["adapters"], secure["prepared_dir"], mode="inprocess",
                             out_dir=tmp_path / "inprocess", rounds=2, min_sites=3)
    assert inprocess["secure_aggregation"] == manifest["secure_aggregation"]
    a, b = _model(run_dir), _model(tmp_path / "inprocess")
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-6)
    # each site's audit log: the statistics and each round's update left as masked releases
    for adapter in secure["adapters"]:
        entries = [e for e in audit.read(audit_trail.audit_path(load_site(adapter)))
                   if e["study_hash"] == secure["study_hash"] and e["outcome"] == "sent"]
        run_ids = sorted({e["run_id"] for e in entries if e["message_type"] == "train"})
        deployed = [e for e in entries if e["run_id"] == run_ids[0]] if run_ids else []
        masked = [e for e in deployed if e["message_type"] == "train"]
        assert [e["server_round"] for e in masked] == [1, 2]
        for entry in masked:
            (record,) = [r for r in entry["records"] if r["name"] == "omopfl.secagg"]
            assert record["values"]["round-id"] == f"train-{entry['server_round']}"
            assert not any(r["kind"] == "array" for r in entry["records"])
        assert sum(1 for e in deployed if e["message_type"] == "query.secagg") == 4  # stats keys, 2 masks, train keys
