"""The coordinator side of omopfl's Flower apps.  Imports nothing that reads patient data, nor the site side.

``statistics``         statistics phase: merges released moments into the global scaler
``secure_statistics``  the same over secure aggregation (masked sums)
``training``           the training ServerApp: statistics, then rounds, then the run directory
``rounds``             the round loop over Flower's public strategy calls (dropped sites, bounded waits)
``grid``               the rounds' Grid: fast pulls over public calls, bytes counted, replies audited
``run_dir``            checkpoints and the finished run's files
``secure_rounds``      training rounds over secure aggregation
``strategies``         FedNova and SCAFFOLD over Flower's strategy API
``discovery``          federated covariate discovery
``validation``         federated external validation of a finished run
``command``            ``omopfl server``: SuperLink + the training app + progress + report
``run_view``           the live run page
"""
