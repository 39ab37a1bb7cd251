"""covariance (the exact float64 merge of the shards' sums of one layer) and export_rome."""

from __future__ import annotations

from typing import Sequence

from .. import models
from .. import stats as stats_mod
from ..provenance import ProvenanceError, environment, read_json


def covariance(model_json: str, corpus_manifest: str, stats_paths: Sequence[str], layer: int, out_path: str) -> None:
    manifest = models.read_manifest(model_json)
    corpus = read_json(corpus_manifest)
    total, count, shards = stats_mod.merge_layer(
        stats_paths, layer, model=manifest["name"], d_m=manifest["d_m"],
        corpus_fingerprint=corpus["corpus_fingerprint"], n_shards=corpus["n_shards"])
    if count != corpus["corpus_tokens"]:
        raise ProvenanceError(f"layer {layer}: shards counted {count} tokens, the corpus has {corpus['corpus_tokens']}")
    record = {**models.provenance_of(manifest), **environment(), "layer": layer,
              "corpus_id": corpus["corpus_id"], "corpus_fingerprint": corpus["corpus_fingerprint"], "shards": shards}
    stats_mod.write_covariance(out_path, total / count, count, record)
    print(f"layer {layer}: C from {count} tokens over {len(shards)} shards")


def export_rome(model_json: str, covariance_path: str, corpus_manifest: str, layer: int, out_npz: str) -> None:
    manifest = models.read_manifest(model_json)
    C, attrs = stats_mod.read_covariance(covariance_path, model=manifest["name"], layer=layer, d_m=manifest["d_m"])
    corpus = read_json(corpus_manifest)
    if attrs["corpus_fingerprint"] != corpus["corpus_fingerprint"]:
        raise ProvenanceError(f"{covariance_path} was computed on another corpus than {corpus_manifest}")
    stats_mod.export_rome_npz(out_npz, C, int(attrs["n_tokens"]), int(corpus["corpus_documents"]))
