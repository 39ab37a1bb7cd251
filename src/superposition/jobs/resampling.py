"""resampling (one layer's convergence ladder and jackknife from the statistics' segment sums) and convergence
(the per-model ladder table and verdict)."""

from __future__ import annotations

import math
from typing import Any, Sequence

from .. import keys as keys_mod
from .. import models
from .. import resampling as rs
from .. import stats as stats_mod
from .. import whitening as whitening_mod
from ..matrices import superposition_matrices
from ..provenance import ProvenanceError, environment, read_json, write_table


def resampling(model_json: str, corpus_manifest: str, stats_paths: Sequence[str], keys_path: str,
               whitening_path: str, selection_path: str, layer: int, ridge: float, cfg: dict[str, Any],
               out_h5: str) -> dict[str, Any]:
    manifest = models.read_manifest(model_json)
    model, d_m = models.identity(manifest), manifest["d_m"]
    corpus = read_json(corpus_manifest)
    selection = read_json(selection_path)
    segments, _ = stats_mod.read_segments(stats_paths, layer, model=model, d_m=d_m,
                                          corpus_fingerprint=corpus["corpus_fingerprint"], n_shards=corpus["n_shards"])
    K_all, pool, _ = keys_mod.read_keys(keys_path, model=model, layer=layer, d_m=d_m)
    m = len(selection["selected"])
    if pool[:m] != selection["selected"]:
        raise ProvenanceError(f"{keys_path} holds keys of other facts than {selection_path} selects; rerun keys")
    w, w_attrs = whitening_mod.read_whitening(whitening_path, model=model, layer=layer, d_m=d_m)
    if w_attrs["corpus_fingerprint"] != corpus["corpus_fingerprint"] or w.ridge != ridge:
        raise ProvenanceError(f"{whitening_path} is of another corpus or ridge than the statistics; rerun whitening")
    K = K_all[:m]
    result = rs.layer_resampling(segments, K, d_m=d_m, ridge=ridge, null_threshold=cfg["null_space_threshold"],
                                 null_relative=cfg["null_space_relative"], top_k=cfg["top_pairs"],
                                 confidence=cfg["confidence"],
                                 P_full=superposition_matrices(K, w.cholesky)["P"], full_eigenvalues=w.eigenvalues)
    record = {**models.provenance_of(manifest), **environment(), "layer": layer, "ridge": ridge,
              "corpus_fingerprint": corpus["corpus_fingerprint"], "n_tokens": result["full"]["n_tokens"],
              "case_ids": selection["selected"], "confidence": cfg["confidence"],
              "segments": [s.id for s in segments], "segment_tokens": [s.count for s in segments],
              "segment_blocks": [s.block for s in segments]}
    rs.write_resampling(out_h5, result, record)
    kurt = result["intervals"]["P_excess_kurtosis"]
    print(f"layer {layer}: {len(result['ladder'])} ladder points from {result['ladder'][0]['n_tokens']} tokens, "
          f"{result['n_blocks']} jackknife blocks; P excess kurtosis {result['full']['P_excess_kurtosis']:.3f} "
          f"(SE {kurt['se']:.3f})")
    return result


LADDER_COLUMNS = ["layer", "n_tokens", "tokens_per_dim", *rs.C_STATISTICS, *rs.LADDER_STATISTICS,
                  *[f"{name}_doubling_change" for name in rs.HEADLINE]]
VERDICT_COLUMNS = ["layer", "statistic", "n_tokens", "converged_from_tokens", "converged_from_tokens_per_dim",
                   "reached", "last_doubling_change"]


def convergence(model_json: str, resampling_paths: Sequence[str], layers: Sequence[int], selection_path: str,
                tolerance: float, out_ladder: str, out_verdict: str) -> list[dict[str, Any]]:
    """The ladder of every layer in one table, and the verdict per layer and headline statistic; a statistic not
    converged at the run's own N is a warning in the log (and the report), not an error."""
    manifest = models.read_manifest(model_json)
    selection = read_json(selection_path)
    ladder_rows, verdict_rows = [], []
    for layer, path in zip(layers, resampling_paths):
        result = rs.read_resampling(path, model=models.identity(manifest), layer=layer,
                                    case_ids=selection["selected"])
        ladder = result["ladder"]
        n_tokens = [int(row["n_tokens"]) for row in ladder]
        changes = {name: rs.doubling_changes(n_tokens, [row[name] for row in ladder]) for name in rs.HEADLINE}
        for i, row in enumerate(ladder):
            ladder_rows.append({**row, "layer": layer, "n_tokens": n_tokens[i],
                                **{f"{name}_doubling_change": changes[name][i] for name in rs.HEADLINE}})
        for name in rs.HEADLINE:
            verdict = rs.converged_from(n_tokens, [row[name] for row in ladder], tolerance)
            since = verdict["converged_from_tokens"]
            verdict_rows.append({"layer": layer, "statistic": name, "n_tokens": n_tokens[-1], **verdict,
                                 "converged_from_tokens_per_dim": since / manifest["d_m"] if since else None,
                                 "reached": int(verdict["reached"])})
    write_table(out_ladder, ladder_rows, LADDER_COLUMNS)
    write_table(out_verdict, verdict_rows, VERDICT_COLUMNS)
    for name in rs.HEADLINE:
        rows = [r for r in verdict_rows if r["statistic"] == name]
        missing = [r for r in rows if not r["reached"]]
        worst = max((r["last_doubling_change"] for r in rows if not math.isnan(r["last_doubling_change"])),
                    default=math.nan)
        if missing:
            print(f"WARNING {manifest['name']}: {name} has not converged at this run's N = {rows[0]['n_tokens']} "
                  f"tokens in {len(missing)} of {len(rows)} layers (the last doubling of the corpus changed it by "
                  f"up to {100 * worst:.1f}%, tolerance {100 * tolerance:g}%): more corpus would change it")
        else:
            since = max(r["converged_from_tokens"] for r in rows)
            print(f"{manifest['name']}: {name} converged in every layer from N = {since} tokens "
                  f"({since / manifest['d_m']:.1f} per key dimension; last doubling at most {100 * worst:.2f}%)")
    return verdict_rows
