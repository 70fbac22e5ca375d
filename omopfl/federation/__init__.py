"""omopfl's Flower apps, split by where the code runs.

``site/``          what runs at a hospital, beside its CDM (see :mod:`omopfl.federation.site`): the ClientApp
                   and its trust boundary, its handlers, the worker, omopfl's ClientApp process, SuperExec
                   and the site node (``omopfl train --site --superlink``)
``coordinator/``   what runs at the coordinator (see :mod:`omopfl.federation.coordinator`): the ServerApps
                   (statistics, training rounds, discovery, validation), strategies, ``omopfl server``,
                   the live run page; imports nothing that reads patient data
Both
``codec``          the wire format of statistics and training: record names and keys
``codec_secure_statistics``, ``codec_secure_rounds``, ``codec_validation``
                   the wire formats of secure aggregation and federated validation
``run_config``     the run configuration schema of every app (and the apps' pyproject files)
``processes``      SuperLink, site nodes, ``flwr run``: started in their own sessions, stopped by PID
``flower_internals`` every Flower internal omopfl touches, behind one version gate
``local``          runs on one machine (in process, or a loopback deployment): statistics, training,
                   discovery, validation

This package imports none of them, so importing the coordinator side never pulls in the site side.
"""

__all__: list[str] = []
