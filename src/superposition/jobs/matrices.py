"""matrices (G, P, Q, W, A of one layer) and top_pairs (the table of its largest off-diagonal P entries)."""

from __future__ import annotations

import csv
from typing import Any

from .. import facts as facts_mod
from .. import keys as keys_mod
from .. import matrices as matrices_mod
from .. import models
from .. import whitening as whitening_mod
from ..provenance import ProvenanceError, atomic_path, environment, read_json

TOP_PAIR_COLUMNS = ["rank", "p", "p_reverse", "w", "a", "case_id_i", "subject_i", "prompt_i", "case_id_j",
                    "subject_j", "prompt_j"]


def matrices(model_json: str, keys_path: str, whitening_path: str, selection_path: str, layer: int,
             out_h5: str) -> None:
    manifest = models.read_manifest(model_json)
    selection = read_json(selection_path)
    K_all, pool, key_attrs = keys_mod.read_keys(keys_path, model=manifest["name"], layer=layer, d_m=manifest["d_m"])
    if pool[: len(selection["selected"])] != selection["selected"]:
        raise ProvenanceError(f"{keys_path} holds keys of other facts than {selection_path} selects; rerun keys")
    m = len(selection["selected"])
    K = K_all[:m]
    w, w_attrs = whitening_mod.read_whitening(whitening_path, model=manifest["name"], layer=layer, d_m=manifest["d_m"])
    mats = matrices_mod.superposition_matrices(K, w.cholesky)
    record = {**models.provenance_of(manifest), **environment(), "layer": layer, "ridge": w.ridge,
              "corpus_fingerprint": w_attrs["corpus_fingerprint"], "n_tokens": w_attrs["n_tokens"],
              "facts": selection["facts"]}
    matrices_mod.write_matrices(out_h5, mats, selection["selected"], record)
    off = matrices_mod.off_diagonal(mats["P"])
    print(f"layer {layer}: m={m}, off-diagonal P mean {off.mean():.4f}, max {off.max():.4f}")


def top_pairs(model_json: str, matrices_path: str, selection_path: str, facts_cfg: dict[str, Any], layer: int,
              n_top: int, out_tsv: str) -> None:
    manifest = models.read_manifest(model_json)
    selection = read_json(selection_path)
    mats, _, _ = matrices_mod.read_matrices(matrices_path, model=manifest["name"], layer=layer,
                                            case_ids=selection["selected"])
    facts, _ = facts_mod.load_facts({**facts_cfg, "case_ids": selection["selected"]})
    P, W, A = mats["P"], mats["W"], mats["A"]
    with atomic_path(out_tsv) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
            writer.writerow(TOP_PAIR_COLUMNS)
            for rank, (i, j, value) in enumerate(matrices_mod.top_pairs(P, n_top)):
                writer.writerow([rank, f"{value:.6f}", f"{P[j, i]:.6f}", f"{W[i, j]:.6f}", f"{A[i, j]:.6f}",
                                 facts[i].case_id, facts[i].subject, facts[i].text,
                                 facts[j].case_id, facts[j].subject, facts[j].text])
    print(f"layer {layer}: the {min(n_top, len(facts) * (len(facts) - 1))} largest off-diagonal P entries")
