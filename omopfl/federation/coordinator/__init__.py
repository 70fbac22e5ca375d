"""The coordinator side of omopfl's Flower apps.  Imports nothing that reads patient data.

``statistics``         statistics phase: merges released moments into the global scaler
``secure_statistics``  the same over secure aggregation (masked sums)
``training``           the training ServerApp: statistics, then rounds, then the run directory
``secure_rounds``      training rounds over secure aggregation
``strategies``         the FedAvg family over Flower's public strategy calls
``discovery``          federated covariate discovery
``validation``         federated external validation of a finished run
``command``            ``omopfl server``: SuperLink + the training app + progress + report
``run_view``           the live run page
"""
