"""top_pairs: the table of the largest off-diagonal P entries of every layer, with both facts (presentation)."""

from __future__ import annotations

import csv
from typing import Any, Sequence

from .. import facts as facts_mod
from .. import keys as keys_mod
from .. import matrices as matrices_mod
from .. import models
from ..provenance import atomic_path, read_json

TOP_PAIR_COLUMNS = ["layer", "rank", "p", "p_reverse", "w", "a", "case_id_i", "subject_i", "prompt_i",
                    "first_position_i", "case_id_j", "subject_j", "prompt_j", "first_position_j"]


def top_pairs(model_json: str, matrix_paths: Sequence[str], layers: Sequence[int], selection_path: str,
              keys_path: str, facts_cfg: dict[str, Any], n_top: int, out_tsv: str) -> None:
    """One table for the model: the ``n_top`` largest off-diagonal P entries of every layer, with both facts."""
    manifest = models.read_manifest(model_json)
    selection = read_json(selection_path)
    facts, _ = facts_mod.load_facts({**facts_cfg, "case_ids": selection["selected"]})
    first = {c: int(flag) for c, (_, _, flag) in keys_mod.read_key_positions(keys_path, model=manifest["name"]).items()}
    with atomic_path(out_tsv) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
            writer.writerow(TOP_PAIR_COLUMNS)
            for layer, path in zip(layers, matrix_paths):
                mats, _, _ = matrices_mod.read_matrices(path, model=manifest["name"], layer=layer,
                                                        case_ids=selection["selected"])
                P, W, A = mats["P"], mats["W"], mats["A"]
                for rank, (i, j, value) in enumerate(matrices_mod.top_pairs(P, n_top)):
                    writer.writerow([layer, rank, f"{value:.6f}", f"{P[j, i]:.6f}", f"{W[i, j]:.6f}",
                                     f"{A[i, j]:.6f}", facts[i].case_id, facts[i].subject, facts[i].text,
                                     first[facts[i].case_id], facts[j].case_id, facts[j].subject, facts[j].text,
                                     first[facts[j].case_id]])
    print(f"{manifest['name']}: the {n_top} largest off-diagonal P entries of {len(layers)} layers")
