"""The site's ``query.covariates`` handler (issue 13b): which covariate ids it releases.

Called only from :func:`omopfl.federation.site.app.serve` after the study gate (an approved study, the
prepared dataset of exactly that study).  It reads the prepared covariate matrix (``covariates.npz``)
and releases the ids held by at least the site's own ``min_cell_count`` persons
(:func:`omopfl.release.covariate_ids`; a coordinator's lower ``min-persons`` never lowers it).  No count
leaves, only ids.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context, RecordDict

from omopfl import release
from omopfl.config import SiteConfig
from omopfl.errors import SiteFailure
from omopfl.federation import codec

__all__ = ["covariates_reply", "released_covariates"]


def released_covariates(folder: Path, site: SiteConfig, requested: int = 0) -> list[int]:
    """The covariate ids the site's release rule lets leave, from its prepared dataset ``folder``."""
    from omopfl.covariates import COVARIATES_FILE, load_matrix, persons_per_covariate

    path = folder / COVARIATES_FILE
    if not path.is_file():
        raise SiteFailure("not_prepared")
    matrix = load_matrix(path)
    return release.covariate_ids(persons_per_covariate(matrix), site.min_cell_count, requested)


def covariates_reply(content: RecordDict, context: Context, site: SiteConfig) -> RecordDict:
    """Reply to ``query.covariates``: the released ids (see :func:`released_covariates`)."""
    request = codec.decode_covariates_request(content)
    folder = Path(str(context.node_config.get("prepared-dir", ""))) / site.name
    return codec.encode_covariates_reply(site.name, released_covariates(folder, site, request.min_persons))
