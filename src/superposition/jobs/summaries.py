"""summaries (per-layer statistics table), kde (density curves on a grid) and kurtosis_vs_m."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .. import keys as keys_mod
from .. import matrices as matrices_mod
from .. import models
from .. import resampling as rs
from .. import summaries as summ
from .. import whitening as whitening_mod
from ..provenance import ProvenanceError, environment, read_json, write_table

ANGLE_GRID_DEG = np.linspace(0.0, 180.0, 361)


def _layer_matrices(model_json: str, matrix_paths: Sequence[str], layers: Sequence[int], selection_path: str
                    ) -> tuple[dict[str, Any], dict[str, Any], list[tuple[int, dict[str, np.ndarray], dict]]]:
    """The manifest, the selection and every layer's matrices (checked against both): m x m each, small."""
    manifest = models.read_manifest(model_json)
    selection = read_json(selection_path)
    per_layer = []
    for layer, path in zip(layers, matrix_paths):
        mats, _, attrs = matrices_mod.read_matrices(path, model=models.identity(manifest), layer=layer,
                                                    case_ids=selection["selected"])
        per_layer.append((layer, mats, attrs))
    return manifest, selection, per_layer


def summaries(model_json: str, matrix_paths: Sequence[str], layers: Sequence[int], selection_path: str,
              out_tsv: str, resampling_paths: Sequence[str] = ()) -> None:
    """The per-layer table; with the layers' resampling files (computed statistics) each C-dependent statistic
    also gets its jackknife standard error and interval (imported statistics: empty)."""
    manifest, selection, each = _layer_matrices(model_json, matrix_paths, layers, selection_path)
    rows = [summ.layer_row(layer, mats, attrs.get("n_tokens")) for layer, mats, attrs in each]
    for row, path in zip(rows, resampling_paths):
        result = rs.read_resampling(path, model=models.identity(manifest), layer=row["layer"],
                                    case_ids=selection["selected"])
        # consistency check: the jackknife's estimates are of these matrices (same C, keys and ridge)
        if not np.isclose(result["full"]["P_excess_kurtosis"], row["P_excess_kurtosis"], rtol=1e-7, atol=1e-9):
            raise ProvenanceError(f"{path}: P excess kurtosis {result['full']['P_excess_kurtosis']!r} differs from "
                                  f"the matrices' {row['P_excess_kurtosis']!r}; rerun resampling")
        row.update(rs.interval_row(result["intervals"]))
        row["jackknife_blocks"] = result["attrs"]["n_blocks"]
    write_table(out_tsv, rows, [*summ.columns(), "jackknife_blocks", *rs.interval_columns()])
    print(f"{manifest['name']}: summarised {len(rows)} layers"
          + (f", intervals from {rows[0]['jackknife_blocks']} jackknife blocks" if resampling_paths else ""))


def kde(model_json: str, matrix_paths: Sequence[str], layers: Sequence[int], selection_path: str,
        kde_grid: Sequence[float], out_kde: str) -> None:
    manifest, selection, each = _layer_matrices(model_json, matrix_paths, layers, selection_path)
    grid = np.linspace(float(kde_grid[0]), float(kde_grid[1]), int(kde_grid[2]))
    curves, angle_curves, q_grids = {"P": {}, "W": {}, "A": {}, "Q": {}}, {"W": {}, "A": {}}, {}
    for (layer, mats, _), path in zip(each, matrix_paths):
        for name in ("P", "W", "A"):
            curves[name][layer] = summ.kde(matrices_mod.off_diagonal(mats[name]), grid,
                                           f"the off-diagonal {name} of {path}")
        q_off = matrices_mod.off_diagonal(mats["Q"])
        pad = 0.1 * (q_off.max() - q_off.min())
        q_grids[layer] = np.linspace(q_off.min() - pad, q_off.max() + pad, len(grid))
        curves["Q"][layer] = summ.kde(q_off, q_grids[layer], f"the off-diagonal Q of {path}")
        for name in ("W", "A"):
            angle_curves[name][layer] = summ.kde(summ.angles_deg(matrices_mod.off_diagonal(mats[name])),
                                                 ANGLE_GRID_DEG, f"the {name} angles of {path}")
    summ.write_kdes(out_kde, grid, curves, ANGLE_GRID_DEG, angle_curves, q_grids,
                    {**models.provenance_of(manifest), **environment(), "layers": list(layers),
                     "case_ids": selection["selected"]})
    print(f"{manifest['name']}: density curves of {len(layers)} layers on {len(grid)} points")


KURTOSIS_VS_M_COLUMNS = ["layer", "m", "all_known", "P_excess_kurtosis", "subsets", "subsets_mean", "subsets_std",
                         "subsets_q025", "subsets_q975"]


def kurtosis_vs_m(model_json: str, keys_path: str, whitening_paths: Sequence[str], layers: Sequence[int],
                  m_values: Sequence[int], out_tsv: str, n_subsets: int = 0, seed: int = 0) -> None:
    """Kurtosis of off-diagonal P for the first m known facts, and its spread over ``n_subsets`` random
    m-subsets of the known facts (each (seed, layer, m) its own generator, so adding an m changes no other row)."""
    manifest = models.read_manifest(model_json)
    rows = []
    for layer, path in zip(layers, whitening_paths):
        K, pool, _ = keys_mod.read_keys(keys_path, model=models.identity(manifest), layer=layer, d_m=manifest["d_m"])
        w, _ = whitening_mod.read_whitening(path, model=models.identity(manifest), layer=layer, d_m=manifest["d_m"])
        for m, kurt in summ.kurtosis_vs_m(K, w.cholesky, [*m_values, len(pool)]):
            row = {"layer": layer, "m": m, "all_known": int(m == len(pool)), "P_excess_kurtosis": kurt}
            if n_subsets and m < len(pool):  # every known fact: one subset only
                spread = summ.kurtosis_of_fact_subsets(K, w.cholesky, m, n_subsets,
                                                       np.random.default_rng([seed, layer, m]))
                row.update({"subsets": n_subsets, "subsets_mean": float(spread.mean()),
                            "subsets_std": float(spread.std(ddof=1)) if n_subsets > 1 else None,
                            "subsets_q025": float(np.quantile(spread, 0.025)),
                            "subsets_q975": float(np.quantile(spread, 0.975))})
            rows.append(row)
    write_table(out_tsv, rows, KURTOSIS_VS_M_COLUMNS)
