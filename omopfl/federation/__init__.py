"""Flower apps of omopfl, split by where the code runs.

``codec``       the wire format: the only module that knows record names and keys (both sides)
``client_app``  runs at a site: reads the site's prepared dataset, replies with released aggregates
``server_app``  runs at the coordinator: merges released moments into the global scaler; it imports
                nothing that reads patient data (no prepare, features, linking or db)
``runner``      runs everything on one machine (in-process, or a loopback SuperLink + SuperNodes)

This package imports none of them, so importing the server side never pulls in the site side.
"""

__all__: list[str] = []
