"""omopfl's SuperExec for a site's SuperNode: every ClientApp message runs omopfl's site runtime.

``omopfl train --site`` always starts Flower's SuperNode with ``--isolation process`` and this
process beside it.  It is Flower's own SuperExec loop (``run_superexec``: the same Runtime API calls,
tokens and task bookkeeping) with omopfl's executor
(:func:`omopfl.federation.flower_internals.site_executor`), which starts
:mod:`omopfl.federation.site.runtime` for every ClientApp task instead of Flower's ``flwr-clientapp``,
so a coordinator's app bundle is checked and never installed or imported
(:mod:`omopfl.federation.site.app`).

Two ways to start a task:

``--fork`` (the default of ``omopfl train --site``)
    in a fork of this process, which has already imported Flower, omopfl and (without the site
    worker) torch: Flower (1.41, 1.42) would start a fresh Python for every message, which costs one to
    several seconds on a small machine.  Each message still gets its own process.
``--subprocess`` (``--poll-seconds 0``: Flower's stock polling)
    in a fresh ``python -I -m omopfl.federation.site.runtime``.

Usage (what :func:`omopfl.federation.site.node.serve_site` runs)::

    python -I -m omopfl.federation.site.superexec --runtime-api-address 127.0.0.1:PORT --insecure \
        --parent-pid PID --fork
"""

from __future__ import annotations

import argparse

__all__ = ["main", "require_checked_flower"]


def require_checked_flower() -> None:
    """Raise :class:`~omopfl.errors.FlowerVersionError` (one line: what is installed, what to install) unless
    the installed Flower is one :mod:`omopfl.federation.flower_internals` was checked against."""
    from omopfl.errors import FlowerVersionError
    from omopfl.federation.flower_internals import version_problem

    problem = version_problem()
    if problem:
        raise FlowerVersionError(problem)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="omopfl's Flower SuperExec for a site's SuperNode")
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--insecure", action="store_true")
    parser.add_argument("--root-certificates")
    parser.add_argument("--parent-pid", type=int)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--fork", dest="fork", action="store_true", default=True)
    mode.add_argument("--subprocess", dest="fork", action="store_false")
    parser.add_argument("--preload-torch", action="store_true", help="also import torch (no site worker)")
    args = parser.parse_args(argv)

    from omopfl.federation import flower_internals
    from omopfl.federation.site import runtime as site_runtime

    require_checked_flower()
    if args.fork:  # what every ClientApp message needs, imported once (the forks inherit it)
        flower_internals.preload_clientapp_runtime()
        import omopfl.federation.site.app
        import omopfl.federation.site.runtime
        import omopfl.federation.site.training
        import omopfl.federation.site.worker
        import omopfl.prepare  # noqa: F401  (the statistics handlers: pandas)

        if args.preload_torch:  # the handlers run torch in the fork when there is no site worker
            import torch  # noqa: F401

        flower_internals.shorten_clientapp_pulls()
    flower_internals.run_site_superexec(args.runtime_api_address, insecure=args.insecure,
                                      root_certificates=args.root_certificates, parent_pid=args.parent_pid,
                                      fork=args.fork, run_task=site_runtime.main,
                                      module="omopfl.federation.site.runtime")


if __name__ == "__main__":
    main()
