"""The superposition matrices of m knowledge keys K (m x d_m) under a key second moment C.

* ``G = K C^-1 K^T`` (by triangular solves with C's Cholesky factor; no explicit inverse)
* ``P_ij = G_ij / G_ii``: the interference a closed-form edit of fact i causes on fact j (diagonal 1)
* ``Q = K K^T``; activation cosine ``A_ij = Q_ij / sqrt(Q_ii Q_jj)``
* whitening cosine ``W_ij = G_ij / sqrt(G_ii G_jj)`` = cosine of ``C^{-1/2} k``
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from .provenance import ProvenanceError, check_artifact, get_attrs, open_h5, write_h5

NAMES = ("P", "Q", "W", "A")


def whitened_keys(K: np.ndarray, cholesky: np.ndarray) -> np.ndarray:
    """``L^-1 K^T`` with ``C = L L^T``: keys as rows ``(n, d_m)`` in, whitened keys as columns ``(d_m, n)`` out (a
    single key ``(d_m,)`` gives ``(d_m,)``), by a triangular solve."""
    import scipy.linalg  # here: the figure and summary jobs import this module without needing it

    return scipy.linalg.solve_triangular(cholesky, np.asarray(K, dtype=np.float64).T, lower=True)


def gram_whitened(K: np.ndarray, cholesky: np.ndarray) -> np.ndarray:
    """``K C^-1 K^T`` with ``C = L L^T``: solve ``L Y = K^T``, then ``G = Y^T Y`` (exactly symmetric)."""
    Y = whitened_keys(K, cholesky)
    return Y.T @ Y


def p_matrix(G: np.ndarray) -> np.ndarray:
    return G / np.diag(G)[:, None]


def cosine(M: np.ndarray) -> np.ndarray:
    d = np.sqrt(np.diag(M))
    return M / np.outer(d, d)


class DegenerateKeyError(ValueError):
    """A key is zero or not finite: its row of P (divided by G_ii) and its cosines would be NaN or Inf."""


def superposition_matrices(K: np.ndarray, cholesky: np.ndarray, case_ids: Sequence[int] | None = None
                           ) -> dict[str, np.ndarray]:
    K = np.asarray(K, dtype=np.float64)
    norms = np.linalg.norm(K, axis=1)
    bad = np.flatnonzero(~np.isfinite(norms) | (norms == 0))
    if bad.size:
        names = [case_ids[i] if case_ids is not None else i for i in bad[:10]]
        raise DegenerateKeyError(f"{bad.size} key(s) are zero or not finite (case_ids {names}): P_ij = G_ij/G_ii "
                                 f"is undefined for them; check the keys file and the facts' subjects")
    G = gram_whitened(K, cholesky)
    Q = K @ K.T
    return {"G": G, "P": p_matrix(G), "Q": Q, "W": cosine(G), "A": cosine(Q)}


def off_diagonal(M: np.ndarray) -> np.ndarray:
    """The m(m-1) off-diagonal entries, row-major."""
    m = M.shape[0]
    return M[~np.eye(m, dtype=bool)]


def top_pairs(P: np.ndarray, k: int) -> list[tuple[int, int, float]]:
    """The k largest off-diagonal entries of P as (row, column, value), largest first."""
    m = P.shape[0]
    k = min(k, m * (m - 1))
    values = P.copy()
    values[np.arange(m), np.arange(m)] = -np.inf
    flat = np.argsort(values, axis=None, kind="stable")[::-1][:k]
    return [(int(i // m), int(i % m), float(values.flat[i])) for i in flat]


def write_matrices(path, mats: dict[str, np.ndarray], case_ids: Sequence[int], record: dict[str, Any]) -> None:
    write_h5(path, {**{name: mats[name] for name in ("G", *NAMES)}, "case_ids": np.asarray(case_ids, dtype=np.int64)},
             {**record, "m": len(case_ids), "dtype": "float64"})


def read_matrices(path, *, model: str | Mapping[str, Any], layer: int, case_ids: Sequence[int] | None = None):
    with open_h5(path, "matrices", "matrices") as f:
        attrs = get_attrs(f)
        check_artifact(attrs, path, "matrices file", "matrices", model, layer=layer)
        stored = [int(c) for c in f["case_ids"][()]]
        if case_ids is not None and stored != list(case_ids):
            raise ProvenanceError(f"{path} was computed for other facts than the current selection "
                                  f"({len(stored)} stored case_ids vs {len(case_ids)} selected; first differing "
                                  f"position {next((i for i, (a, b) in enumerate(zip(stored, case_ids)) if a != b), min(len(stored), len(case_ids)))}); "
                                  f"rerun the matrices rule")
        mats = {name: f[name][()] for name in ("G", *NAMES)}
    return mats, stored, attrs
