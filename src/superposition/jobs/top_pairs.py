"""top_pairs: the table of the largest off-diagonal P entries of every layer, with both facts (presentation)."""

from __future__ import annotations

from typing import Any, Sequence

from .. import facts as facts_mod
from .. import keys as keys_mod
from .. import matrices as matrices_mod
from .. import models
from ..provenance import read_json, write_table

TOP_PAIR_COLUMNS = ["layer", "rank", "p", "p_reverse", "w", "a", "case_id_i", "subject_i", "prompt_i",
                    "first_position_i", "case_id_j", "subject_j", "prompt_j", "first_position_j"]


def top_pairs(model_json: str, matrix_paths: Sequence[str], layers: Sequence[int], selection_path: str,
              keys_path: str, facts_cfg: dict[str, Any], n_top: int, out_tsv: str) -> None:
    """One table for the model: the ``n_top`` largest off-diagonal P entries of every layer, with both facts."""
    manifest = models.read_manifest(model_json)
    selection = read_json(selection_path)
    facts, _ = facts_mod.load_facts({**facts_cfg, "case_ids": selection["selected"]})
    first = keys_mod.read_first_positions(keys_path, model=models.identity(manifest))
    rows = []
    for layer, path in zip(layers, matrix_paths):
        mats, _, _ = matrices_mod.read_matrices(path, model=models.identity(manifest), layer=layer,
                                                case_ids=selection["selected"])
        P, W, A = mats["P"], mats["W"], mats["A"]
        for rank, (i, j, value) in enumerate(matrices_mod.top_pairs(P, n_top)):
            fi, fj = facts[i], facts[j]
            rows.append({"layer": layer, "rank": rank, "p": f"{value:.6f}", "p_reverse": f"{P[j, i]:.6f}",
                         "w": f"{W[i, j]:.6f}", "a": f"{A[i, j]:.6f}",
                         "case_id_i": fi.case_id, "subject_i": fi.subject, "prompt_i": fi.text,
                         "first_position_i": int(first[fi.case_id]),
                         "case_id_j": fj.case_id, "subject_j": fj.subject, "prompt_j": fj.text,
                         "first_position_j": int(first[fj.case_id])})
    write_table(out_tsv, rows, TOP_PAIR_COLUMNS)
    print(f"{manifest['name']}: the {n_top} largest off-diagonal P entries of {len(layers)} layers")
