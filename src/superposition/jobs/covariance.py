"""covariance (the exact float64 merge of the shards' sums of one layer, or statistics imported from ROME's cache
layout or a bare mean), key_scale (the probe the import checks against) and export_rome (ROME's cache layout)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .. import models
from .. import stats as stats_mod
from ..provenance import ProvenanceError, environment, read_json, sha256_file, write_json


def covariance(model_json: str, corpus_manifest: str, stats_paths: Sequence[str], layer: int, out_path: str) -> None:
    manifest = models.read_manifest(model_json)
    corpus = read_json(corpus_manifest)
    total, count, shards = stats_mod.merge_layer(
        stats_paths, layer, model=models.identity(manifest), d_m=manifest["d_m"],
        corpus_fingerprint=corpus["corpus_fingerprint"], n_shards=corpus["n_shards"])
    if count != corpus["corpus_tokens"]:
        raise ProvenanceError(f"layer {layer}: the statistics shards counted {count} tokens but {corpus_manifest} says "
                              f"the corpus has {corpus['corpus_tokens']}: rerun activation_stats")
    record = {**models.provenance_of(manifest), **environment(), "layer": layer,
              "corpus_id": corpus["corpus_id"], "corpus_fingerprint": corpus["corpus_fingerprint"], "shards": shards}
    stats_mod.write_covariance(out_path, total / count, count, record)
    print(f"layer {layer}: C from {count} tokens over {len(shards)} shards")


def imported_covariance(model_json: str, source_path: str, key_scale_json: str, layer: int,
                        statistics: dict[str, Any], out_path: str) -> dict[str, Any]:
    """C of one layer from an imported file (models.<name>.statistics), checked; its provenance names the file, its
    sha256 and what the file says about itself."""
    manifest = models.read_manifest(model_json)
    family = models.family_for(manifest["model_type"])
    module = family.module_name(layer)
    source = statistics["source"]
    scales = read_json(key_scale_json)
    if scales.get("model") != manifest["name"] or str(layer) not in scales.get("layers", {}):
        raise ProvenanceError(f"{key_scale_json} holds the key scale of model {scales.get('model')!r} layers "
                              f"{sorted(scales.get('layers', {}))}, expected model {manifest['name']!r} layer {layer}")
    scale = scales["layers"][str(layer)]
    path = Path(source_path)
    if source == "rome_npz":
        hit = stats_mod.rome_file_regex(module).fullmatch(path.name)
        if not hit:
            raise ProvenanceError(f"{path} is not named as ROME names the statistics of {module} (layer {layer})")
        C, info = stats_mod.import_rome_npz(path, d_m=manifest["d_m"], key_scale=scale)
        info["file_name_sample_size"] = int(hit.group("sample_size")) if hit.group("sample_size") else None
    elif source == "mean_npy":
        C, info = stats_mod.import_mean_npy(path, d_m=manifest["d_m"], n_tokens=statistics["n_tokens"],
                                            key_scale=scale)
    else:
        raise ValueError(f"models.{manifest['name']}.statistics.source is {source!r}: nothing to import")
    digest = sha256_file(path)
    record = {**models.provenance_of(manifest), **environment(), "layer": layer,
              "corpus_id": f"imported:{source}",
              # consumers compare fingerprints (whitening -> matrices, editing): the source file's identity
              "corpus_fingerprint": f"imported:{digest[:16]}",
              "source": {"path": str(path.resolve()), "sha256": digest, "module": module, **info,
                         "key_scale": scale}}
    stats_mod.write_covariance(out_path, C, info["count"], record)
    print(f"layer {layer}: C imported from {path} ({source}, {info['count']} tokens, sha256 {digest[:16]}), "
          f"trace / probe key scale {info['trace_over_key_scale']:.3g}")
    return record


def key_scale(model_json: str, layers: Sequence[int], device: str, out_json: str) -> dict[str, Any]:
    """||k||^2 over a fixed probe text for every layer: the reference of the imported statistics' sum-vs-mean check."""
    manifest = models.read_manifest(model_json)
    model, tokenizer = models.load(manifest, device, "float32")
    scales = stats_mod.probe_key_scale(model, tokenizer, list(layers))
    record = {**models.provenance_of(manifest), **environment(), "probe": "superposition.stats.PROBE_TEXTS",
              "layers": {str(layer): value for layer, value in scales.items()}}
    write_json(out_json, record)
    print(f"key scale of {len(scales)} layers over {next(iter(scales.values()))['n_tokens']} probe tokens")
    return record


def export_rome(model_json: str, covariance_paths: Sequence[str], layers: Sequence[int], corpus_manifest: str | None,
                out_dir: str, out_manifest: str) -> dict:
    """Every layer's statistics as ROME's ``{module}_float32_mom2_{sample_size}.npz`` in ``out_dir``, and a manifest
    with each file's sha256 and the provenance, so that a file passed to a colleague can be checked.

    ``corpus_manifest`` None: the statistics were imported; the sample size is the one their source files declare
    (no suffix where they declare none, as ROME names statistics over a whole dataset)."""
    manifest = models.read_manifest(model_json)
    corpus = read_json(corpus_manifest) if corpus_manifest else None
    family = models.family_for(manifest["model_type"])
    # the documents actually used, not the configured count
    sample_size = int(corpus["corpus_documents"]) if corpus else None
    files, sources = {}, {}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for layer, path in zip(layers, covariance_paths):
        C, attrs = stats_mod.read_covariance(path, model=models.identity(manifest), layer=layer, d_m=manifest["d_m"])
        if corpus is not None and attrs["corpus_fingerprint"] != corpus["corpus_fingerprint"]:
            raise ProvenanceError(f"{path} was computed on another corpus than {corpus_manifest}; rerun covariance")
        if corpus is None:
            if not str(attrs.get("corpus_id", "")).startswith("imported:"):
                raise ProvenanceError(f"{path} was computed on a corpus (corpus_id {attrs.get('corpus_id')!r}) but "
                                      f"no corpus manifest was given")
            source = attrs["source"]
            sample_size = source.get("sample_size")
            sources[str(layer)] = {"path": source["path"], "sha256": source["sha256"]}
        suffix = "" if sample_size is None else f"_{int(sample_size)}"
        name = f"{family.module_name(layer)}_float32_mom2{suffix}.npz"
        stats_mod.export_rome_npz(out / name, C, int(attrs["n_tokens"]), sample_size)
        files[name] = {"layer": layer, "n_tokens": int(attrs["n_tokens"]), "sha256": sha256_file(out / name)}
    if corpus is not None:
        origin = {"corpus_id": corpus["corpus_id"], "corpus_fingerprint": corpus["corpus_fingerprint"],
                  "corpus_documents": sample_size, "corpus_tokens": corpus["corpus_tokens"],
                  "max_length": corpus.get("max_length")}
    else:
        origin = {"corpus_id": attrs["corpus_id"], "imported_from": sources}
    record = {**models.provenance_of(manifest), **environment(), **origin,
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
