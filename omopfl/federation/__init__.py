"""Flower apps of omopfl, split by where the code runs.

Site side
    ``site_app``     the site's trust boundary: omopfl's ClientApp; every message checked (approved study,
                     settings, policy), handled, audited, replied
    ``site_runtime`` omopfl's ClientApp process (instead of ``flwr-clientapp``): checks the app bundle, never
                     installs or imports it
    ``site_exec``    omopfl's SuperExec beside the SuperNode: starts ``site_runtime`` for every task
    ``flower_runtime`` the Flower internals the site runtime and SuperExec use, behind one version gate
    ``client_app``   statistics handlers: reads the site's prepared dataset, replies with released aggregates
    ``site_train``   ``train`` / ``evaluate`` handlers
    ``worker``       the site's long-lived worker (torch loaded, tensors cached) the handlers forward to
    ``supernode``    ``omopfl train --site --superlink``: Flower's SuperNode with omopfl's SuperExec and worker
Coordinator side (imports nothing that reads patient data: no prepare, features, linking or db)
    ``server_app``   statistics: merges released moments into the global scaler
    ``server_train`` training: rounds over Flower strategies, checkpoints, dropped sites, run directory
    ``server``       ``omopfl server``: SuperLink + the training app + progress + report
Both / one machine
    ``codec``        the wire format: the only module that knows record names and keys
    ``deploy``       SuperLink, SuperNodes (through ``omopfl train --site``), ``flwr run``; stopped by PID
    ``runner``       statistics on one machine (in-process grid, or loopback deployment)
    ``train``        training on one machine (in-process grid, or loopback deployment)

This package imports none of them, so importing the server side never pulls in the site side.
"""

__all__: list[str] = []
