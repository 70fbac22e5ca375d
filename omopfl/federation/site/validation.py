"""The site's handler of ``query.validate`` (federated external validation, issue 14).

Called by the site's trust boundary (:mod:`omopfl.federation.site.app`) once the study is approved
and the prepared dataset is that study's.  Everything that decides what is computed comes from the
approved study and the site's own data: the model is built from the approved study's model
settings and the site's prepared features; the message contributes only the weights and the
global scaler, each checked against that model and dataset.  The result is
:func:`omopfl.external_validation.validate_site` under the site's ``min_cell_count``.
"""

from __future__ import annotations

import json

import numpy as np
from flwr.app import Context, RecordDict

from omopfl import policy
from omopfl.config import SiteConfig
from omopfl.errors import Refusal
from omopfl.federation import codec
from omopfl.federation.codec_validation import decode_request, encode_result
from omopfl.federation.site.statistics import check_scaler, load_site_dataset

__all__ = ["validate_reply"]


def validate_reply(content: RecordDict, context: Context, site: SiteConfig, approved: policy.ApprovedStudy,
                   already_sent: int) -> RecordDict:
    """The site's released validation result for a ``query.validate`` message (see the module docstring)."""
    import torch

    from omopfl.external_validation import TrainedRun, validate_site
    from omopfl.models import IMAGE_KINDS, build_model

    request = decode_request(content)
    settings = dict(approved.settings)
    rules = site.policy
    if not rules.release_metrics or rules.dp_required or settings.get("model-kind") not in rules.allowed_models:
        raise Refusal("policy")
    if settings.get("model-covariates"):  # sparse covariate models are not validated this way (yet)
        raise Refusal("not_allowed")
    if already_sent >= 1:  # one validation per run (each is a release of metrics of an arbitrary model)
        raise Refusal("round_limit")
    if request.model["kind"] != settings.get("model-kind"):
        raise Refusal("settings_mismatch")
    if settings["model-kind"] in ("mlp", "fusion"):  # the kinds whose widths and dropout shape the model
        for key in ("hidden", "dropout"):
            try:
                sent = json.loads(request.model[key] or "null")
            except ValueError:
                raise codec.CodecError(f"model-{key} is not JSON") from None
            if sent != json.loads(settings[f"model-{key}"]):
                raise Refusal("settings_mismatch")
    _site, prepared = load_site_dataset(dict(context.node_config))
    scaler = check_scaler(prepared, request.scaler, approved.hash)
    if not (np.all(np.isfinite(scaler.scaler.mean)) and np.all(np.isfinite(scaler.scaler.scale))
            and np.all(np.asarray(scaler.scaler.scale) > 0)):
        raise codec.CodecError("the scaler holds non-finite or non-positive values")
    from omopfl.study import ModelSpec

    spec = ModelSpec.from_settings(str(settings["model-kind"]), str(settings["model-hidden"]),
                                   str(settings["model-dropout"]))
    n_genes = len(prepared.gene_names) if spec.kind == "fusion" else 0
    image_size = int(prepared.images.shape[-1]) if spec.kind in IMAGE_KINDS and prepared.images is not None \
        else 0
    reference = build_model(spec, len(prepared.feature_names), n_genes, image_size).state_dict()
    if set(request.state) != set(reference):
        raise codec.CodecError("the weights are not the approved model's")
    for name, tensor in reference.items():
        weights = request.state[name]
        if tuple(weights.shape) != tuple(tensor.shape) or weights.dtype != tensor.numpy().dtype:
            raise codec.CodecError("the weights are not the approved model's")
        if weights.dtype.kind == "f" and not np.all(np.isfinite(weights)):
            raise codec.CodecError("non-finite weights")
    model_description = {"kind": spec.kind, "hidden": list(spec.hidden), "dropout": list(spec.dropout),
                         "n_genes": n_genes, "image_size": image_size}
    run = TrainedRun(run_dir=policy.state_dir(site), manifest={"model": model_description,
                                                                "study_hash": approved.hash},
                     scaler=scaler, state={k: np.array(v) for k, v in request.state.items()})
    with torch.no_grad():
        result = validate_site(run, prepared, int(site.min_cell_count), request.rows)
    result["site"] = site.name
    return encode_result(site.name, result)
