"""The site's node: ``omopfl train --site ADAPTER --superlink HOST:PORT`` serves one site as a SuperNode.

Serves the site's operator (often its data engineer).  The node runs at the site, beside its database,
as a Flower SuperNode; every message it gets passes the site's trust boundary
(:mod:`omopfl.federation.site.app`).  :func:`serve_site_node` checks the command line before anything
starts; the ``train`` command (:mod:`omopfl.cli_train`) routes here when ``--superlink`` is given.
"""

from __future__ import annotations

from pathlib import Path

from omopfl.cli_output import console, load_site
from omopfl.errors import ConfigError

__all__ = ["serve_site_node"]


def serve_site_node(sites: list[Path] | None, superlink: str, prepared: Path, *, root_certificates: Path | None,
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
