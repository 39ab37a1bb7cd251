"""Per-layer distribution statistics of the off-diagonal entries of P, Q, W and A.

Excess kurtosis uses ``scipy.stats.kurtosis`` with its defaults (Fisher, biased), as the paper; densities are
Gaussian KDEs with Scott's bandwidth evaluated on a fixed grid. For the cosine matrices W and A the angles
``arccos`` in degrees are summarised too (near-orthogonal keys have angles near 90 degrees).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import h5py
import numpy as np

# scipy.stats (a second to import) is imported in the functions that use it: most figure jobs import this module
# only to read densities
from .matrices import NAMES, off_diagonal
from .provenance import check_artifact, get_attrs, open_h5, write_h5

SMALL = 0.05  # |entry| below this counts as "near zero" (near-orthogonal in whitening space for P)
ANGLE_BAND = 5.0  # degrees around 90


def excess_kurtosis(values: np.ndarray) -> float:
    import scipy.stats
    return float(scipy.stats.kurtosis(np.asarray(values, dtype=np.float64)))


def angles_deg(cosines: np.ndarray) -> np.ndarray:
    return np.degrees(np.arccos(np.clip(cosines, -1.0, 1.0)))


def kde(values: np.ndarray, grid: np.ndarray, what: str = "the values") -> np.ndarray:
    """Gaussian KDE (Scott's bandwidth) of ``values`` (``what``, for the error) evaluated on ``grid``."""
    import scipy.stats

    values = np.asarray(values, dtype=np.float64)
    if values.size == 0 or np.ptp(values) == 0:
        raise ValueError(f"cannot estimate the density of {what}: all {values.size} values are equal"
                         + (f" ({values[0]:g})" if values.size else ""))
    return scipy.stats.gaussian_kde(values, bw_method="scott")(grid)


def describe(values: np.ndarray) -> dict[str, float]:
    import scipy.stats
    values = np.asarray(values, dtype=np.float64)
    return {
        "excess_kurtosis": excess_kurtosis(values),
        "mean": float(values.mean()),
        "std": float(values.std()),
        "skewness": float(scipy.stats.skew(values)),
        "min": float(values.min()),
        "max": float(values.max()),
        "frac_abs_lt_0.05": float(np.mean(np.abs(values) < SMALL)),
    }


def describe_angles(cosines: np.ndarray) -> dict[str, float]:
    angles = angles_deg(cosines)
    return {"angle_mean_deg": float(angles.mean()),
            "frac_within_5deg_of_90": float(np.mean(np.abs(angles - 90.0) <= ANGLE_BAND))}


def columns() -> list[str]:
    cols = ["layer", "m", "n_values", "n_tokens"]
    for name in NAMES:
        cols += [f"{name}_{key}" for key in describe(np.arange(4.0))]
        if name in ("W", "A"):
            cols += [f"{name}_{key}" for key in describe_angles(np.zeros(2))]
    return cols


def layer_row(layer: int, mats: dict[str, np.ndarray], n_tokens: int | None = None) -> dict[str, Any]:
    m = mats["P"].shape[0]
    row: dict[str, Any] = {"layer": layer, "m": m, "n_values": m * (m - 1), "n_tokens": n_tokens}
    for name in NAMES:
        off = off_diagonal(mats[name])
        row.update({f"{name}_{k}": v for k, v in describe(off).items()})
        if name in ("W", "A"):
            row.update({f"{name}_{k}": v for k, v in describe_angles(off).items()})
    return row


def write_kdes(path, grid: np.ndarray, curves: dict[str, dict[int, np.ndarray]],
               angle_grid: np.ndarray, angle_curves: dict[str, dict[int, np.ndarray]],
               q_grids: dict[int, np.ndarray], record: dict[str, Any]) -> None:
    """KDE curves: /grid and /<P|W|A>/layer_<l> on the fixed grid, Q on its own per-layer grid, angles in degrees."""
    datasets = {"grid": grid, "angle_grid_deg": angle_grid}
    datasets.update({f"{name}/layer_{layer}": density for name, per_layer in curves.items()
                     for layer, density in per_layer.items()})
    datasets.update({f"Q_grid/layer_{layer}": q_grid for layer, q_grid in q_grids.items()})
    datasets.update({f"{name}_angle/layer_{layer}": density for name, per_layer in angle_curves.items()
                     for layer, density in per_layer.items()})
    write_h5(path, datasets, {**record, "bandwidth": "scott"})


def read_kdes(path, *, model: str | Mapping[str, Any]) -> dict[str, Any]:
    """The curves of ``write_kdes``: grids as arrays, each group as {layer: density}; the model is checked."""
    with open_h5(path, "density curves", "kde") as f:
        check_artifact(get_attrs(f), path, "density-curves file", "kde", model)
        out: dict[str, Any] = {"grid": f["grid"][()], "angle_grid_deg": f["angle_grid_deg"][()]}
        for group in f:
            if isinstance(f[group], h5py.Group):
                out[group] = {int(name.split("_")[1]): f[group][name][()] for name in f[group]}
    return out


def kurtosis_vs_m(K: np.ndarray, cholesky: np.ndarray, m_values: Sequence[int]) -> list[tuple[int, float]]:
    """Excess kurtosis of off-diagonal P for the first m keys, for each m (m larger than the pool is skipped)."""
    from .matrices import superposition_matrices

    out = []
    for m in sorted(set(int(v) for v in m_values)):
        if 2 <= m <= len(K):
            P = superposition_matrices(K[:m], cholesky)["P"]
            out.append((m, excess_kurtosis(off_diagonal(P))))
    return out


def kurtosis_of_fact_subsets(K: np.ndarray, cholesky: np.ndarray, m: int, n_subsets: int,
                             rng: np.random.Generator) -> np.ndarray:
    """Excess kurtosis of off-diagonal P for ``n_subsets`` random m-subsets of the keys (without replacement):
    the spread of the m-study over which facts were chosen. G of the whole pool is formed once; a subset's P is
    its rows and columns of G divided by their diagonal."""
    from .matrices import gram_whitened, p_matrix

    G = gram_whitened(K, cholesky)
    values = np.empty(n_subsets)
    for i in range(n_subsets):
        pick = np.sort(rng.choice(len(K), size=m, replace=False))
        values[i] = excess_kurtosis(off_diagonal(p_matrix(G[np.ix_(pick, pick)])))
    return values


def interference_separation(relative_interference: np.ndarray, logp_drop: np.ndarray,
                            forgotten: np.ndarray) -> dict[str, float]:
    """How well the predicted interference on each retained fact tells the ones the model forgot.

    Spearman's rho of interference against the drop of log p(target_true), and the ROC AUC of the interference for
    forgotten vs kept facts (Mann-Whitney U / (n_forgotten n_kept): 0.5 is chance, 1 means every forgotten fact
    received more interference than every kept one). NaN where a statistic is undefined.
    """
    import scipy.stats
    x = np.asarray(relative_interference, dtype=np.float64)
    y = np.asarray(logp_drop, dtype=np.float64)
    lost = np.asarray(forgotten, dtype=bool)
    n_lost, n_kept = int(lost.sum()), int((~lost).sum())
    rho = float(scipy.stats.spearmanr(x, y).statistic) if len(x) > 2 else math.nan
    auc = math.nan
    if n_lost and n_kept:
        auc = float(scipy.stats.mannwhitneyu(x[lost], x[~lost]).statistic / (n_lost * n_kept))
    return {
        "n_retained": len(x),
        "n_forgotten": n_lost,
        "spearman_rho": rho,
        "auc_forgotten_vs_kept": auc,
        "median_interference_forgotten": float(np.median(x[lost])) if n_lost else math.nan,
        "median_interference_kept": float(np.median(x[~lost])) if n_kept else math.nan,
        "max_interference": float(x.max()) if len(x) else math.nan,
    }
