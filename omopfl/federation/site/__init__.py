"""The site side of omopfl's Flower apps: what runs at a hospital, beside its OMOP CDM.

``app``         the trust boundary: omopfl's ClientApp; every message checked (approved study, settings,
                policy), handled, audited, replied
``statistics``  statistics handlers: the prepared dataset's released aggregates
``training``    ``train`` / ``evaluate`` handlers
``validation``  external validation of a finished run on the site's data
``covariates``  covariate discovery counts
``worker``      the long-lived worker (torch loaded, tensors cached) the handlers forward to
``runtime``     omopfl's ClientApp process (instead of ``flwr-clientapp``)
``superexec``   omopfl's SuperExec beside the SuperNode: starts ``runtime`` for every task
``node``        ``omopfl train --site --superlink``: Flower's SuperNode with omopfl's SuperExec and worker
"""
