"""``omopfl sites approve | studies | revoke | audit | identity``: a data engineer's commands for a site.

They sit in the ``sites`` group beside ``sites check`` (:func:`register` adds them); each reads or
writes only the site's state folder (:mod:`omopfl.policy`, :mod:`omopfl.audit`), never a database.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from omopfl.errors import ConfigError, DataError

__all__ = ["register"]

console = Console()


def _emit_json(payload: object) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")


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
    from omopfl.config import load_site
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
        _emit_json({"approved": entry.to_dict()})
        return
    console.print(f"[green]approved[/green] study {entry.name} ({entry.hash}) for site {site.name} "
                  f"in {policy.state_dir(site)}; revoke with: omopfl sites revoke {adapter} {entry.hash[:12]}")


def sites_studies(
    adapter: Annotated[Path, typer.Argument(help="The site's adapter TOML.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the studies this site approved (and revoked)."""
    from omopfl import policy
    from omopfl.config import load_site

    site = load_site(adapter)
    entries = policy.approved_studies(site)
    if as_json:
        _emit_json({"site": site.name, "studies": [e.to_dict() for e in entries]})
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
    from omopfl.config import load_site

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
    from omopfl.config import load_site
    from omopfl.federation.site.audit_trail import audit_path

    site = load_site(adapter)
    path = audit_path(site)
    entries = audit.read(path, run_id=run)
    intact, lines = audit.verify(path)
    if as_json:
        _emit_json({"site": site.name, "log": str(path), "chain_intact": intact, "lines": lines, "entries": entries})
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
    from omopfl.config import load_site
    from omopfl.federation.site.secure import identity_public_key

    site = load_site(adapter)
    sys.stdout.write(f'{site.name} = "{identity_public_key(site)}"\n')


def register(group: typer.Typer) -> None:
    """Add the site's own commands to the ``sites`` group."""
    group.command("approve")(sites_approve)
    group.command("studies")(sites_studies)
    group.command("revoke")(sites_revoke)
    group.command("audit")(sites_audit)
    group.command("identity")(sites_identity)
