"""covariance (the exact float64 merge of the shards' sums of one layer) and export_rome (ROME's cache layout)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .. import models
from .. import stats as stats_mod
from ..provenance import ProvenanceError, environment, read_json, sha256_file, write_json


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


def export_rome(model_json: str, covariance_paths: Sequence[str], layers: Sequence[int], corpus_manifest: str,
                out_dir: str, out_manifest: str) -> dict:
    """Every layer's statistics as ROME's ``{module}_float32_mom2_{sample_size}.npz`` in ``out_dir``, and a manifest
    with each file's sha256 and the provenance, so that a file passed to a colleague can be checked."""
    manifest = models.read_manifest(model_json)
    corpus = read_json(corpus_manifest)
    family = models.family_for(manifest["model_type"])
    sample_size = int(corpus["corpus_documents"])  # the documents actually used, not the configured count
    files = {}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for layer, path in zip(layers, covariance_paths):
        C, attrs = stats_mod.read_covariance(path, model=manifest["name"], layer=layer, d_m=manifest["d_m"])
        if attrs["corpus_fingerprint"] != corpus["corpus_fingerprint"]:
            raise ProvenanceError(f"{path} was computed on another corpus than {corpus_manifest}; rerun covariance")
        name = f"{family.module_name(layer)}_float32_mom2_{sample_size}.npz"
        stats_mod.export_rome_npz(out / name, C, int(attrs["n_tokens"]), sample_size)
        files[name] = {"layer": layer, "n_tokens": int(attrs["n_tokens"]), "sha256": sha256_file(out / name)}
    record = {**models.provenance_of(manifest), **environment(), "corpus_id": corpus["corpus_id"],
              "corpus_fingerprint": corpus["corpus_fingerprint"], "corpus_documents": sample_size,
              "corpus_tokens": corpus["corpus_tokens"], "max_length": corpus.get("max_length"),
              "stored_dtype": "float32 (the sum of k k^T, mom2.mom2; divide by mom2.count for C)",
              "source_dtype": "float64", "files": files}
    write_json(out_manifest, record)
    print(f"{len(files)} ROME statistics files in {out_dir}, sample size {sample_size}")
    return record


def verify_rome_export(out_manifest: str | Path) -> None:
    """Check every file a ROME-export manifest lists against its sha256 (raises naming the first mismatch)."""
    record = read_json(out_manifest)
    folder = Path(out_manifest).parent / "wikipedia_stats"
    for name, entry in record["files"].items():
        if sha256_file(folder / name) != entry["sha256"]:
            raise ProvenanceError(f"{folder / name} does not match the sha256 in {out_manifest}")
