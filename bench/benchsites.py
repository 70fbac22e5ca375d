"""Synthetic sites for the benches: generate, prepare and approve, as a site's data engineer would.

One copy for every bench script (``fed_vs_pooled``, ``dp_bench``, ``scale_bench``), imported by
path (``bench/`` is not a package: the scripts put their own folder first on ``sys.path`` when run).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def make_sites(folder: Path, n_sites: int, persons: int, seed: int, *, image_share: float = 0.0,
               omics_share: float = 0.0) -> list[Any]:
    """``n_sites`` synthetic DuckDB sites of ``persons`` persons on average; their ``SiteSummary`` list.

    The total ``n_sites * persons`` is split in the synthetic default spread of site sizes; each
    summary has the site's ``adapter`` path and its ``persons``.
    """
    from omopfl.synth import run_synth

    summaries = run_synth(out_dir=folder / "sites", n_sites=n_sites, persons=n_sites * persons, seed=seed,
                          image_share=image_share, omics_share=omics_share, adapters_dir=folder / "adapters",
                          progress=False)
    if any(s.backend != "duckdb" for s in summaries):
        raise RuntimeError("run_synth did not write DuckDB sites (is OMOPFL_SYNTH_PG_URL set?)")
    return list(summaries)


def prepare_and_approve(study_path: Path, adapters: list[Path], prepared_dir: Path) -> list[dict[str, Any]]:
    """Each site builds the study's cohorts, prepares its dataset and approves the study.

    Returns one summary per site: ``site``, ``cohort_persons``, ``outcomes``, ``fatal``, ``warnings``.
    """
    from omopfl import policy
    from omopfl.config import load_site
    from omopfl.db import site_engine
    from omopfl.prepare import prepare_site
    from omopfl.study import load_study

    study = load_study(study_path)
    sites = []
    for adapter in adapters:
        site = load_site(adapter)
        engine = site_engine(site)
        try:
            _folder, manifest = prepare_site(engine, site, study, prepared_dir)
        finally:
            engine.dispose()
        policy.approve(site, study)  # omopfl sites approve
        validation = manifest["validation"]
        sites.append({"site": site.name, "cohort_persons": int(manifest["persons"]),
                      "outcomes": int(manifest["outcomes"]), "fatal": int(validation["fatal_count"]),
                      "warnings": int(validation["warning_count"])})
    return sites
