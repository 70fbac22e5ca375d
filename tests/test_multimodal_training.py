"""Federated training of the image models (``cnn``, ``fusion``, ``densenet121``) on linked DICOM and omics.

Two small synthetic sites with linked MR slices and expression files are prepared for the example
study (images 32x32, 20 genes); the server builds its round-0 model from the study's image size and
gene list alone (it never sees the data), and the sites load those weights strictly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from omopfl.federation.local import run_training

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def multimodal(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from omopfl import policy
    from omopfl.config import load_site
    from omopfl.db import make_engine
    from omopfl.prepare import prepare_site
    from omopfl.study import load_study
    from omopfl.synth import run_synth

    base = tmp_path_factory.mktemp("multimodal")
    text = (ROOT / "examples" / "t2dm_hf" / "study.toml").read_text().replace('"../../cohorts/', f'"{ROOT}/cohorts/')
    studies = {}
    for kind in ("cnn", "fusion", "densenet121"):
        studies[kind] = base / f"study_{kind}.toml"
        studies[kind].write_text(text.replace('kind = "logistic"', f'kind = "{kind}"\nhidden = [16, 8]'))
    run_synth(base / "synth", n_sites=2, persons=[700, 500], seed=3, image_share=0.6, omics_share=0.6,
              progress=False)
    adapters = [base / "synth" / "adapters" / f"{name}.toml" for name in ("site_a", "site_b")]
    for kind, study in studies.items():
        for adapter in adapters:
            site = load_site(adapter)
            engine = make_engine(site.database_url())
            try:
                prepare_site(engine, site, load_study(study), base / f"prepared_{kind}")
            finally:
                engine.dispose()
            policy.approve(site, load_study(study))
    return {"base": base, "studies": studies, "adapters": adapters}


@pytest.mark.parametrize("kind", ["cnn", "fusion", "densenet121"])
def test_image_and_fusion_models_train_federated(multimodal, kind: str) -> None:
    from omopfl.models import build_model
    from omopfl.study import load_study

    run_dir = multimodal["base"] / f"run_{kind}"
    manifest = run_training(multimodal["studies"][kind], multimodal["adapters"],
                            multimodal["base"] / f"prepared_{kind}", out_dir=run_dir, rounds=2)
    assert manifest["model"]["kind"] == kind and manifest["model"]["image_size"] == 32
    assert manifest["model"]["n_genes"] == (20 if kind == "fusion" else 0)
    assert manifest["final"]["round"] == 2 and manifest["final"]["train_n"] > 0
    # the evaluation may be withheld by the release rule (omopfl.release: a confusion cell below k)
    assert manifest["final"]["eval_loss"] is None or np.isfinite(manifest["final"]["eval_loss"])
    spec = load_study(multimodal["studies"][kind])
    features = json.loads((run_dir / "features.json").read_text())["feature_names"]
    model = build_model(spec.model, len(features), manifest["model"]["n_genes"], 32)
    with np.load(run_dir / "model.npz") as saved:
        assert {k: saved[k].shape for k in saved.files} == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if kind == "fusion":  # the omics branch exists and was trained (its weights moved from round 0)
        initial = build_model(spec.model, len(features), 20, 32, seed=spec.training.seed).state_dict()
        with np.load(run_dir / "model.npz") as saved:
            omics = [k for k in saved.files if "omics" in k]
            assert omics and any(not np.allclose(saved[k], initial[k].numpy()) for k in omics)
