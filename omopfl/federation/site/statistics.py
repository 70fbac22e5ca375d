"""The site's statistics handlers (``query.stats``, ``query.scaler``) and its prepared-dataset loading.

They run behind the site's trust boundary (:mod:`omopfl.federation.site.app`), which checks the
study and the message first and audits the reply.  A SuperNode serves the site with its node config::

    flower-supernode ... --node-config "site-config='/etc/omopfl/site_a.toml' prepared-dir='/data/prepared'"

``site-config`` is the site's adapter (its name and ``min_cell_count`` come from there, never
from the server) and ``prepared-dir`` the folder ``omopfl prepare`` wrote ``<site>/`` into.

Handlers
--------
``query.stats``
    Loads the prepared dataset and replies with :func:`site_statistics`: the moments of every
    feature after :func:`omopfl.suppression.suppress` with the site's own ``min_cell_count``
    (optionally with Gaussian noise, :func:`omopfl.moment_noise.noisy_moments`).  A site with fewer
    persons than ``min_cell_count`` replies "withheld", without its count.
``query.scaler``
    Receives the global scaler, checks it against the dataset's features and keeps it: in the
    run's context state (for a training phase of the same run) and as ``scaler.json`` beside
    the prepared dataset.  Replies with an acknowledgement.

Every failure becomes a fixed error code (:data:`omopfl.federation.codec.ERROR_CODES`,
:func:`error_code`); exception text stays in the site's own log (and only the exception's class
name goes there, since driver messages can echo row contents).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Context, RecordDict

from omopfl.atomic import write_json
from omopfl.config import load_site
from omopfl.errors import SiteFailure
from omopfl.federation import codec

if TYPE_CHECKING:  # the data modules (pandas, sqlalchemy) load only where a handler needs them
    from omopfl.config import SiteConfig
    from omopfl.prepare import PreparedSite

__all__ = ["site_statistics", "site_scaler", "load_site_dataset", "SiteFailure", "SCALER_FILE", "stats_reply",
           "scaler_reply", "same_dataset"]

SCALER_FILE = "scaler.json"

_log = logging.getLogger("flwr.omopfl")

# --------------------------------------------------------------------------------------------
# plain functions (callable in tests, no Flower runtime needed)
# --------------------------------------------------------------------------------------------


def site_statistics(
    prepared: PreparedSite,
    min_cell_count: int,
    dp: codec.DPRequest | None = None,
    *,
    site: str | None = None,
    rng: np.random.Generator | None = None,
    groups: dict[str, list[str]] | None = None,
    counts: tuple[str, ...] | list[str] = (),
) -> RecordDict:
    """The whole stats reply of a site, exactly as it goes on the wire.

    Parameters
    ----------
    prepared:
        The site's prepared dataset (``x`` float32 with NaN for missing, one row per person).
    min_cell_count:
        The site's own minimum cell count (its adapter's ``min_cell_count``).
    dp:
        If given, the released moments are :func:`omopfl.moment_noise.noisy_moments` with this budget and
        public bounds (every feature needs bounds, else :class:`SiteFailure` ``dp_bounds``).
    site:
        The site's name from its adapter (default: the name the dataset was prepared under).
    rng:
        Noise source for ``dp`` (default: ``numpy.random.default_rng()``, seeded from OS entropy).
    groups, counts:
        The study's one-hot groups and count features (:func:`omopfl.release.moments`).

    Returns
    -------
    RecordDict
        :func:`codec.encode_site_stats` of the released moments.  Which persons and features
        are withheld is decided on the true counts (the minimum-cell-count rule is about persons,
        not about noisy numbers); with ``dp`` only the released numbers are noisy.
    """
    from omopfl import release
    from omopfl.moment_noise import noisy_moments
    from omopfl.suppression import Released

    names = list(prepared.feature_names)
    released = release.moments(prepared.x, names, prepared.n, min_cell_count, groups=groups, counts=counts)
    dp_info = None
    if dp is not None:
        try:
            bounds = dp.bounds_for(names)
        except KeyError:
            raise SiteFailure("dp_bounds") from None
        if not released.withheld:
            noisy = noisy_moments(prepared.x, names, bounds, dp.epsilon, dp.delta, rng or np.random.default_rng())
            keep = np.array(released.released, dtype=bool)
            released = Released(tuple(names), released.released, noisy.persons, noisy.n[keep], noisy.mean[keep],
                                 noisy.m2[keep])
        dp_info = (dp.epsilon, dp.delta)
    return codec.encode_site_stats(site if site is not None else prepared.site, released, dp=dp_info)


def check_scaler(prepared: PreparedSite, global_scaler: codec.GlobalScaler,
                 study_hash: str | None = None) -> codec.GlobalScaler:
    """The scaler if it fits the dataset and the study, else ``SiteFailure`` ``feature_mismatch`` / ``study_mismatch``.

    ``study_hash`` is the study the message is for (approved at the site, whose dataset hash the trust
    boundary compared with the prepared one): the scaler must have been built for that study, not for
    the study the dataset was prepared with (a study that changed only training settings shares the
    dataset).  Without it (a caller outside a message), the prepared dataset's study hash is used.
    """
    if list(global_scaler.feature_names) != list(prepared.feature_names):
        raise SiteFailure("feature_mismatch")
    expected = study_hash if study_hash is not None else prepared.manifest.get("study_hash", "")
    if global_scaler.study_hash and expected and global_scaler.study_hash != expected:
        raise SiteFailure("study_mismatch")
    return global_scaler


def site_scaler(prepared: PreparedSite, content: RecordDict, study_hash: str | None = None) -> codec.GlobalScaler:
    """Decode the global scaler and check it fits the dataset and the study (:func:`check_scaler`)."""
    return check_scaler(prepared, codec.decode_scaler(content), study_hash)


def load_site_dataset(node_config: dict) -> tuple[SiteConfig, PreparedSite]:
    """The site's adapter and prepared dataset named by the node config (``SiteFailure`` if unusable)."""
    adapter = node_config.get("site-config")
    prepared_dir = node_config.get("prepared-dir")
    if not isinstance(adapter, str) or not adapter or not isinstance(prepared_dir, str) or not prepared_dir:
        raise SiteFailure("config")
    from omopfl.prepare import load_prepared

    site = load_site(adapter)
    prepared = load_prepared(Path(prepared_dir) / site.name)
    if prepared.site != site.name:
        raise SiteFailure("not_prepared")
    return site, prepared


# --------------------------------------------------------------------------------------------
# handlers (called by the site's trust boundary, omopfl.federation.site.app, after its checks)
# --------------------------------------------------------------------------------------------


def stats_reply(content: RecordDict, context: Context, site: SiteConfig,
                study: Mapping[str, Any] | None = None, *, dp: codec.DPRequest | None = None) -> RecordDict:
    """The site's released moments for a ``query.stats`` message (or withheld); ``study`` is the approved
    study's summary (its one-hot groups and count features, :func:`omopfl.policy.study_summary`)."""
    request = codec.decode_stats_request(content)
    _site_config, prepared = load_site_dataset(dict(context.node_config))
    study = study or {}
    if not same_dataset(prepared, request.study_hash, study):
        raise SiteFailure("study_mismatch")
    return site_statistics(prepared, site.min_cell_count, dp, site=site.name,
                           groups=dict(study.get("categories", {})), counts=list(study.get("count_features", [])))


def same_dataset(prepared: PreparedSite, study_hash: str, study: Mapping[str, Any] | None = None) -> bool:
    """The prepared dataset serves the study ``study_hash`` whose approved summary is ``study``: equal dataset
    hashes (:attr:`omopfl.study.StudyConfig.dataset_hash`), else (a dataset or approval from before dataset
    hashes) equal study hashes."""
    dataset = (study or {}).get("dataset_hash")
    if dataset and prepared.manifest.get("dataset_hash"):
        return str(prepared.manifest["dataset_hash"]) == str(dataset)
    return study_hash == prepared.manifest.get("study_hash", "")


def scaler_reply(content: RecordDict, context: Context, site: SiteConfig,
                 study: Mapping[str, Any] | None = None) -> RecordDict:
    """Keep the global scaler of a ``query.scaler`` message (context state and ``scaler.json``); acknowledge.

    ``study``: the approved study's summary; the scaler must be for that study (its hash) and the prepared
    dataset its dataset (:func:`same_dataset`)."""
    _site_config, prepared = load_site_dataset(dict(context.node_config))
    study_hash = str((study or {}).get("hash") or prepared.manifest.get("study_hash", ""))
    global_scaler = site_scaler(prepared, content, study_hash)
    if global_scaler.study_hash != study_hash or not same_dataset(prepared, study_hash, study):
        raise SiteFailure("study_mismatch")
    for name, record in codec.scaler_record(global_scaler).items():
        context.state[name] = record
    write_json(Path(str(context.node_config["prepared-dir"])) / site.name / SCALER_FILE,
               global_scaler.to_dict(), allow_nan=True)
    return codec.encode_ack(site.name)
