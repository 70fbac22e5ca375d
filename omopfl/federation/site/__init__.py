"""The site side of omopfl's Flower apps: what runs at a hospital, beside its OMOP CDM.

``app``          the trust boundary: omopfl's ClientApp; every message served, audited, replied (or refused)
``bundle``       the code gate: a coordinator's app bundle may only name omopfl's own ClientApp
``admission``    which site, which study, which settings: a message is checked against the approved study
``secure``       the site's side of secure aggregation (keys, participant checks, masked releases)
``audit_trail``  the site's record of what it sent (its audit log's path, entries, counts)
``statistics``   statistics handlers: the prepared dataset's released aggregates
``training``     ``train`` / ``evaluate`` handlers
``validation``   external validation of a finished run on the site's data
``covariates``   covariate discovery counts
``worker``       the long-lived worker (torch loaded, tensors cached) the handlers run in
``runtime``      omopfl's ClientApp process (instead of ``flwr-clientapp``)
``superexec``    omopfl's SuperExec beside the SuperNode: starts ``runtime`` for every task
``node``         ``omopfl train --site --superlink``: Flower's SuperNode with omopfl's SuperExec and worker

Nothing here imports the coordinator side (``tests/test_architecture.py``).
"""
