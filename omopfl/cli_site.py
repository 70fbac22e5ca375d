"""The data engineer at a site: check the CDM, build cohorts, prepare and validate data, approve studies.

``omopfl sites check | approve | studies | revoke | audit | identity``, ``omopfl cohort build | list |
show``, ``omopfl prepare`` and ``omopfl validate``.  Each works on one site's own database or state folder
(:mod:`omopfl.policy`, :mod:`omopfl.audit`); nothing here talks to other sites or a coordinator.  The two
groups (:data:`sites_app`, :data:`cohort_app`) are built here; :mod:`omopfl.cli` adds them and
:func:`prepare`/:func:`validate` to the root app.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from omopfl.cli_output import SiteOption, StudyOption, console, emit_json, load_site, site_connection
from omopfl.errors import ConfigError, DataError

if TYPE_CHECKING:
    from omopfl.config import SiteConfig
    from omopfl.sites import SiteReport

__all__ = ["cohort_app", "prepare", "print_prepare_summary", "sites_app", "validate"]

sites_app = typer.Typer(help="A site's own business: check its CDM, approve studies, see what left it.",
                        no_args_is_help=True)
cohort_app = typer.Typer(help="Build OHDSI cohorts inside a site's database and look at them.", no_args_is_help=True)


# ---------------------------------------------------------------- sites check
def sites_check(
    adapters: Annotated[list[Path], typer.Argument(help="Site adapter TOML files.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Connect to each site, report its CDM version, row counts and what is missing or suspicious."""
    from omopfl.sites import check_site

    reports = []
    for path in adapters:
        with site_connection(path) as (site, conn):
            reports.append(check_site(conn, site))
    if as_json:
        emit_json([r.to_dict() for r in reports])
        return
    for report in reports:
        _print_site_report(report)


def _print_site_report(report: SiteReport) -> None:
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
        emit_json([r.to_dict(min_cell_count=k) for r in results])
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


def cohort_list(
    site: SiteOption,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """Cohorts built at a site, with counts (below min_cell_count shown as <N)."""
    from dataclasses import asdict

    from omopfl.cohort import list_cohorts

    with site_connection(site) as (config, conn):
        cohorts = list_cohorts(conn, config)
    if as_json:
        emit_json([asdict(c) for c in cohorts])
        return
    table = Table(title=f"cohorts at {config.name}")
    for column in ("id", "name", "persons", "records", "built", "translator", "hash"):
        table.add_column(column)
    for c in cohorts:
        table.add_row(str(c.cohort_id), c.name, str(c.persons), str(c.records), c.built_at, c.translator,
                      c.definition_hash)
    console.print(table)


def cohort_show(
    cohort_id: Annotated[int, typer.Argument(help="Cohort id.")],
    site: SiteOption,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """Counts and inclusion-rule attrition of one cohort (below min_cell_count shown as <N)."""
    from omopfl.cohort import show_cohort

    with site_connection(site) as (config, conn):
        detail = show_cohort(conn, config, cohort_id)
    if as_json:
        emit_json(detail.to_dict())
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
        emit_json(manifest)
        return
    print_prepare_summary(config, manifest)
    console.print(f"prepared dataset written to {folder}")


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
        emit_json(manifest["validation"])
    else:
        print_prepare_summary(config, manifest)
    if manifest["validation"].get("fatal_count", 0):
        raise typer.Exit(6)


def print_prepare_summary(config: SiteConfig, manifest: dict) -> None:
    """One site's prepared (or validated) dataset: counts masked below min_cell_count, linking, findings."""
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


# ---------------------------------------------------------------- approvals and the audit log
def _print_summary(summary: dict[str, Any], problems: list[str]) -> None:
    t = summary["training"]
    console.rule(f"study {summary['study']} at site {summary['site']}")
    console.print(f"hash            {summary['hash']}")
    for role, cohort in summary["cohorts"].items():
        digest = f"  sha256 {cohort['sha256']}" if cohort.get("sha256") else ""
        console.print(f"{role + ' cohort':<16}{cohort['file']}{digest}")
    console.print(f"time at risk    days {summary['time_at_risk'][0]} to {summary['time_at_risk'][1]} after index")
    console.print(f"features        {len(summary['features'])}: {', '.join(summary['features'])}")
    linked = summary["linked"]
    if linked["imaging"] or linked["omics_genes"]:
        console.print(f"linked files    imaging {', '.join(linked['imaging']) or 'no'}, "
                      f"omics genes {linked['omics_genes']}")
    params = summary["model"]["parameters"]
    console.print(f"model           {summary['model']['kind']}"
                  + (f", {params:,} weights" if params is not None else ""))
    console.print(f"training        {t['rounds']} rounds x {t['local_epochs']} local epoch(s), "
                  f"batch {t['batch_size']}, learning rate {t['learning_rate']}, {t['strategy']}"
                  + (f" (mu {t['proximal_mu']})" if t["strategy"] == "fedprox" else "")
                  + (f", test fraction {t['test_fraction']}, seed {t['seed']}"
                     if summary.get("split", {}).get("method", "random") == "random" else ""))
    split = summary.get("split", {})
    if split.get("method") == "hash":
        console.print(f"test set        fixed: persons whose keyed hash (seed {split['seed']}) is below "
                      f"{split['test_fraction']}")
    elif split.get("method") == "cohort":
        console.print("test set        fixed: the target persons in the test cohort")
    dp = summary["dp"]
    console.print(f"DP              {'required by the site' if dp['required_by_site'] else 'not required by the site'}"
                  + (f", at most epsilon {dp['max_epsilon']} per release" if dp["max_epsilon"] else ""))
    leaves = summary["leaves"]
    console.rule("what will leave the site")
    console.print(f"- statistics: {leaves['statistics']}")
    console.print(f"- {leaves['weights']}")
    console.print(f"- evaluation metrics: {', '.join(leaves['metrics']) or 'none ([policy] release_metrics = false)'}")
    console.print(f"- {leaves['counts']}")
    for problem in problems:
        console.print(f"[red]refused by the site's policy: {problem}")


def sites_approve(
    adapter: Annotated[Path, typer.Argument(help="The site's adapter TOML.")],
    study: Annotated[Path, typer.Argument(help="The study file to approve (study.toml).")],
    yes: Annotated[bool, typer.Option("--yes", help="Approve without asking (after reading the summary).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary and the approval as JSON.")] = False,
) -> None:
    """Show what a study computes and what will leave the site, then record its hash as approved."""
    from omopfl import policy
    from omopfl.study import load_study

    site = load_site(adapter)
    spec = load_study(study)
    summary = policy.study_summary(spec, site)
    problems = policy.policy_problems(spec, site)
    if not as_json:
        _print_summary(summary, problems)
    if problems:
        raise ConfigError(f"{adapter}: the site's policy refuses study {spec.name}: " + "; ".join(problems))
    if not yes:
        if not sys.stdin.isatty():
            raise ConfigError("omopfl sites approve: no terminal to confirm on: read the summary "
                              "(omopfl sites approve ... --json) and add --yes to approve")
        if not typer.confirm(f"Approve study {spec.name} ({spec.hash[:12]}) for site {site.name}?", default=False):
            console.print("not approved")
            raise typer.Exit(1)
    entry = policy.approve(site, spec)
    if as_json:
        emit_json({"approved": entry.to_dict()})
        return
    console.print(f"[green]approved[/green] study {entry.name} ({entry.hash}) for site {site.name} "
                  f"in {policy.state_dir(site)}; revoke with: omopfl sites revoke {adapter} {entry.hash[:12]}")


def sites_studies(
    adapter: Annotated[Path, typer.Argument(help="The site's adapter TOML.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the studies this site approved (and revoked)."""
    from omopfl import policy

    site = load_site(adapter)
    entries = policy.approved_studies(site)
    if as_json:
        emit_json({"site": site.name, "studies": [e.to_dict() for e in entries]})
        return
    table = Table(title=f"studies approved at site {site.name}")
    for column in ("hash", "study", "approved", "state", "model", "rounds"):
        table.add_column(column)
    for e in entries:
        table.add_row(e.hash[:12], e.name, e.approved_at, "active" if e.active else f"revoked {e.revoked_at}",
                      str(e.settings.get("model-kind", "")), str(e.settings.get("rounds", "")))
    console.print(table if entries else f"site {site.name} has approved no study: omopfl sites approve {adapter} "
                  "STUDY.toml")


def sites_revoke(
    adapter: Annotated[Path, typer.Argument(help="The site's adapter TOML.")],
    study_hash: Annotated[str, typer.Argument(help="The study's hash (or its first 8+ characters).")],
) -> None:
    """Revoke a study's approval: the site refuses its next message."""
    from omopfl import policy

    site = load_site(adapter)
    entry = policy.revoke(site, study_hash.strip().lower())
    console.print(f"revoked study {entry.name} ({entry.hash}) at site {site.name} ({entry.revoked_at})")


def _released(entry: dict[str, Any]) -> str:
    parts = []
    for record in entry.get("records", []):
        if record.get("kind") == "array":
            parts.append(f"{record['name']}: {len(record.get('arrays', []))} arrays")
        elif record.get("kind") == "metric":
            values = record.get("values", {})
            shown = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()
                     if not isinstance(v, list)]
            lists = [k for k, v in values.items() if isinstance(v, list)]
            parts.append(f"{record['name']}: " + ", ".join(shown + [f"{k}[{len(values[k])}]" for k in lists]))
    return "; ".join(parts)


def sites_audit(
    adapter: Annotated[Path, typer.Argument(help="The site's adapter TOML.")],
    run: Annotated[int | None, typer.Option("--run", help="Only this Flower run id.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print every entry as JSON.")] = False,
) -> None:
    """Show what left this site, when and for which study (the site's own append-only log)."""
    from omopfl import audit
    from omopfl.federation.site.audit_trail import audit_path

    site = load_site(adapter)
    path = audit_path(site)
    entries = audit.read(path, run_id=run)
    intact, lines = audit.verify(path)
    if as_json:
        emit_json({"site": site.name, "log": str(path), "chain_intact": intact, "lines": lines, "entries": entries})
    else:
        table = Table(title=f"what left site {site.name}" + (f" in run {run}" if run is not None else ""))
        for column in ("#", "time", "run", "study", "message", "round", "outcome", "bytes", "sha256", "released"):
            table.add_column(column, overflow="fold")
        for e in entries:
            outcome = e.get("outcome", "")
            if e.get("code"):
                outcome += f" {e['code']}"
            table.add_row(str(e.get("seq")), str(e.get("time", ""))[:19], str(e.get("run_id")),
                          str(e.get("study_hash") or "")[:8], str(e.get("message_type")),
                          "" if e.get("server_round") is None else str(e["server_round"]), outcome,
                          str(e.get("bytes")), str(e.get("sha256", ""))[:8], _released(e))
        console.print(table if entries else f"nothing has left site {site.name}" + (
            f" in run {run}" if run is not None else ""))
        console.print(f"{lines} line(s) in {path}; hash chain " + ("intact" if intact else "BROKEN"))
    if not intact:
        raise DataError(f"{path}: the audit log's hash chain is broken (a line was edited or removed)")


def sites_identity(
    adapter: Annotated[Path, typer.Argument(help="The site's adapter TOML.")],
) -> None:
    """Print this site's secure-aggregation identity key (Ed25519, public part) to pin in a study.

    A study's ``[privacy.participants]`` lists one such key per site; each site then masks its statistics
    only against those sites, each key signed by its own site.  The private key stays in the site's state
    folder (made on first use).
    """
    from omopfl.federation.site.secure import identity_public_key

    site = load_site(adapter)
    sys.stdout.write(f'{site.name} = "{identity_public_key(site)}"\n')


# ---------------------------------------------------------------- the groups, in the order --help lists them
sites_app.command("check")(sites_check)
sites_app.command("approve")(sites_approve)
sites_app.command("studies")(sites_studies)
sites_app.command("revoke")(sites_revoke)
sites_app.command("audit")(sites_audit)
sites_app.command("identity")(sites_identity)
cohort_app.command("build")(cohort_build)
cohort_app.command("list")(cohort_list)
cohort_app.command("show")(cohort_show)
