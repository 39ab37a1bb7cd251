"""How sure each number is: the convergence ladder of C and the delete-one-block jackknife over corpus blocks.

The statistics jobs keep the float64 sums of k k^T of consecutive runs of documents apart (corpus segments: B equal
blocks, the first one halved down to d_m tokens). From them, without another forward pass:

* the **ladder**: C_N for nested prefixes of the corpus, at the prefixes nearest to N, N/2, N/4, ... (a doubling
  ladder: the verdict asks how much a statistic still moves over the last doubling of the corpus);
* the **jackknife**: C with one block left out, ``C_-b = (S - S_b) / (N - N_b)``, for each of the B blocks. The
  standard error of a statistic theta is ``sqrt((B - 1)/B * sum_b (theta_-b - mean)^2)`` and the interval
  ``theta +- t_{B-1} SE``.

Why the delete-one-block jackknife and not a bootstrap: every replicate needs a float64 factorisation of a
d_m x d_m matrix (a Cholesky, 0.1 s at d_m = 2,048), so B replicates cost B factorisations where a bootstrap
needs hundreds; a block bootstrap over B blocks has only a few distinct resamples anyway; and every statistic here
is a smooth function of a mean (C) away from singularity, where the jackknife's variance estimate is consistent.
Blocks of contiguous documents in the shuffled order keep the documents' internal correlation inside a block.

Only statistics that depend on C get an interval: Q and A (activation space) are functions of the keys alone and
have no corpus-sampling uncertainty.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import scipy.linalg
import scipy.stats

from .matrices import off_diagonal, superposition_matrices, top_pairs
from .provenance import ProvenanceError, check_artifact, get_attrs, open_h5, write_h5
from .summaries import describe, describe_angles

# Statistics of one C (and the fixed keys): the C-dependent columns of summaries/{model}/layers.tsv
C_STATISTICS = tuple([f"P_{k}" for k in describe(np.arange(4.0))]
                     + [f"W_{k}" for k in describe(np.arange(4.0))]
                     + [f"W_{k}" for k in describe_angles(np.zeros(2))])
# ... and what the ladder adds at each N
LADDER_STATISTICS = ("C_relative_change", "P_relative_change", "top_pairs_overlap", "min_eigenvalue",
                     "max_eigenvalue", "condition_number", "null_space_dim", "null_space_dim_relative")
# what the verdict judges
HEADLINE = ("P_excess_kurtosis", "P_std", "W_excess_kurtosis", "W_angle_mean_deg", "null_space_dim")


@dataclass
class Replicate:
    """One C formed from some segments: its token count and its sum's packed upper triangle."""

    n_tokens: int
    packed: np.ndarray
    label: str


def ladder_prefixes(counts: Sequence[int]) -> list[int]:
    """Indices k (into the segments in corpus order) whose prefix (segments 0..k) is nearest, on a log scale, to
    N, N/2, N/4, ... down to the first segment; each prefix at most once, ascending."""
    cumulative = np.cumsum(np.asarray(counts, dtype=np.float64))
    if not len(cumulative):
        return []
    chosen, target = set(), cumulative[-1]
    while target >= cumulative[0] / math.sqrt(2):
        chosen.add(int(np.argmin(np.abs(np.log(cumulative / target)))))
        target /= 2
    return sorted(chosen)


def replicates(segments: Sequence[Any]) -> tuple[list[Replicate], list[Replicate], Replicate]:
    """The ladder's prefixes, the leave-one-block-out sums (blocks in ascending order; none with fewer than two
    blocks) and the whole corpus, from ``stats.Segment``-like objects (id, block, count, packed) in corpus order."""
    total = np.zeros_like(segments[0].packed)
    prefixes = {}
    wanted = set(ladder_prefixes([s.count for s in segments]))
    blocks: dict[int, list] = {}
    running_count = 0
    for k, segment in enumerate(segments):
        total += segment.packed
        running_count += segment.count
        if k in wanted:
            prefixes[k] = Replicate(running_count, total.copy(), f"first {k + 1} segments")
        entry = blocks.setdefault(segment.block, [0, np.zeros_like(segment.packed)])
        entry[0] += segment.count
        entry[1] += segment.packed
    whole = Replicate(running_count, total, "whole corpus")
    left_out = []
    if len(blocks) >= 2:
        left_out = [Replicate(whole.n_tokens - count, total - block_sum, f"without block {block}")
                    for block, (count, block_sum) in sorted(blocks.items())]
    return [prefixes[k] for k in sorted(prefixes)], left_out, whole


def statistics_of(K: np.ndarray, C: np.ndarray, ridge: float = 0.0) -> tuple[dict[str, float], np.ndarray | None,
                                                                             np.ndarray | None]:
    """The C-dependent statistics of the keys K under C (+ ridge I), P itself and the Cholesky factor; NaN
    statistics (and None) where C + ridge I is not positive definite (a prefix with fewer tokens than d_m)."""
    A = C + ridge * np.eye(len(C)) if ridge else C
    try:
        cholesky = scipy.linalg.cholesky(A, lower=True)
    except np.linalg.LinAlgError:
        return {name: math.nan for name in C_STATISTICS}, None, None
    mats = superposition_matrices(K, cholesky)
    row = {f"P_{k}": v for k, v in describe(off_diagonal(mats["P"])).items()}
    w_off = off_diagonal(mats["W"])
    row.update({f"W_{k}": v for k, v in describe(w_off).items()})
    row.update({f"W_{k}": v for k, v in describe_angles(w_off).items()})
    return row, mats["P"], cholesky


def spectrum_statistics(eigenvalues: np.ndarray, threshold: float, relative: float) -> dict[str, float]:
    """Smallest and largest eigenvalue, condition number and the dimension of AlphaEdit's null space (eigenvalues
    below the absolute ``threshold``, and below ``relative`` times the largest)."""
    smallest, largest = float(eigenvalues[0]), float(eigenvalues[-1])
    return {"min_eigenvalue": smallest, "max_eigenvalue": largest,
            "condition_number": largest / smallest if smallest > 0 else math.inf,
            "null_space_dim": int(np.sum(eigenvalues < threshold)),
            "null_space_dim_relative": int(np.sum(eigenvalues < relative * largest))}


def pair_overlap(P: np.ndarray, P_full: np.ndarray, k: int) -> float:
    """Fraction of the k largest off-diagonal entries of P (as pairs) that are among those of the full-corpus P."""
    ours = {(i, j) for i, j, _ in top_pairs(P, k)}
    full = {(i, j) for i, j, _ in top_pairs(P_full, k)}
    return len(ours & full) / len(full)


def jackknife(values: Sequence[float], estimate: float, confidence: float = 0.95) -> dict[str, float]:
    """Delete-one-block jackknife standard error of a statistic whose full-sample value is ``estimate``, and the
    ``confidence`` interval ``estimate +- t_{B-1} SE`` (Student's t with B - 1 degrees of freedom)."""
    values = np.asarray(values, dtype=np.float64)
    B = len(values)
    if B < 2 or not np.all(np.isfinite(values)) or not math.isfinite(estimate):
        return {"se": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    se = float(math.sqrt((B - 1) / B * np.sum((values - values.mean()) ** 2)))
    half = float(scipy.stats.t.ppf(0.5 + confidence / 2, B - 1)) * se
    return {"se": se, "ci_low": estimate - half, "ci_high": estimate + half}


def doubling_changes(n_tokens: Sequence[int], values: Sequence[float]) -> list[float]:
    """For each ladder point, the relative change of the statistic from the point nearest to half its tokens
    (ratio 1.6-2.5 on the ladder; NaN where there is none, inf where either value is not finite)."""
    n = np.asarray(n_tokens, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    out = []
    for i in range(len(n)):
        ratios = n[i] / n[:i] if i else np.zeros(0)
        near = np.flatnonzero((ratios >= 1.6) & (ratios <= 2.5))
        if not near.size:
            out.append(math.nan)
            continue
        j = near[np.argmin(np.abs(np.log2(ratios[near]) - 1))]
        if not (np.isfinite(v[i]) and np.isfinite(v[j])):
            out.append(math.inf)  # undefined at one end (a singular C): not converged
            continue
        out.append(float(abs(v[i] - v[j]) / abs(v[i])) if v[i] != 0 else (0.0 if v[j] == 0 else math.inf))
    return out


def converged_from(n_tokens: Sequence[int], values: Sequence[float], tolerance: float) -> dict[str, Any]:
    """The verdict for one statistic on one ladder: the smallest N from which every later doubling changed it by
    less than ``tolerance`` (relative), whether the full corpus (the last point) reached it, and the change over the
    last doubling. None where the ladder has no doubling at its end."""
    changes = doubling_changes(n_tokens, values)
    last = changes[-1] if changes else math.nan
    since = None
    for i in range(len(changes) - 1, -1, -1):
        if math.isnan(changes[i]):
            if i == len(changes) - 1:
                break
            continue
        if changes[i] >= tolerance:
            break
        since = int(n_tokens[i])
    return {"converged_from_tokens": since, "reached": bool(since is not None and last < tolerance),
            "last_doubling_change": last}


def layer_resampling(segments: Sequence[Any], K: np.ndarray, *, d_m: int, ridge: float, null_threshold: float,
                     null_relative: float, top_k: int, confidence: float, P_full: np.ndarray | None = None,
                     full_eigenvalues: np.ndarray | None = None) -> dict[str, Any]:
    """Ladder rows, jackknife rows and intervals of every C-dependent statistic of one layer.

    ``P_full``: P of the whole corpus as the matrices computed it (whitening's factor), checked against this C's;
    ``full_eigenvalues``: whitening's spectrum of the same C + ridge I, reused for the ladder's last point.
    """
    from .stats import unpack_upper

    ladder, left_out, whole = replicates(segments)
    C_full = unpack_upper(whole.packed, d_m) / whole.n_tokens
    full_stats, P, _ = statistics_of(K, C_full, ridge)
    if P is None:
        raise np.linalg.LinAlgError(f"C of the whole corpus ({whole.n_tokens} tokens, d_m = {d_m}) is not positive "
                                    f"definite: set whitening.ridge > 0 or use more corpus")
    if P_full is not None and not np.allclose(P, P_full, rtol=1e-8, atol=1e-10):
        raise ValueError("the whole-corpus P of the segments differs from the matrices' P: they are not of the same "
                         "C (consistency check of the statistics files against covariance and whitening)")
    norm_C, norm_P = np.linalg.norm(C_full), np.linalg.norm(P)
    ladder_rows = []
    for rep in ladder:
        if rep.n_tokens == whole.n_tokens:  # the whole corpus: computed above
            C, row, P_n = C_full, dict(full_stats), P
            eigenvalues = full_eigenvalues
        else:
            C = unpack_upper(rep.packed, d_m) / rep.n_tokens
            row, P_n, _ = statistics_of(K, C, ridge)
            eigenvalues = None
        if eigenvalues is None:
            eigenvalues = scipy.linalg.eigh(C + ridge * np.eye(d_m) if ridge else C, eigvals_only=True)
        row.update(spectrum_statistics(eigenvalues, null_threshold, null_relative))
        row.update({"n_tokens": rep.n_tokens, "tokens_per_dim": rep.n_tokens / d_m,
                    "C_relative_change": float(np.linalg.norm(C - C_full) / norm_C),
                    "P_relative_change": float(np.linalg.norm(P_n - P) / norm_P) if P_n is not None else math.nan,
                    "top_pairs_overlap": pair_overlap(P_n, P, top_k) if P_n is not None else math.nan})
        ladder_rows.append(row)
    jack_rows = []
    for rep in left_out:
        row, _, _ = statistics_of(K, unpack_upper(rep.packed, d_m) / rep.n_tokens, ridge)
        jack_rows.append({**row, "n_tokens": rep.n_tokens})
    intervals = {name: jackknife([r[name] for r in jack_rows], full_stats[name], confidence)
                 for name in C_STATISTICS}
    return {"full": {**full_stats, "n_tokens": whole.n_tokens}, "ladder": ladder_rows, "jackknife": jack_rows,
            "intervals": intervals, "n_blocks": len(left_out)}


def interval_columns() -> list[str]:
    """The layers.tsv columns the jackknife adds: SE and interval of every C-dependent statistic."""
    return [f"{name}_{part}" for name in C_STATISTICS for part in ("se", "ci_low", "ci_high")]


def interval_row(intervals: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    return {f"{name}_{part}": intervals[name][part] for name in C_STATISTICS for part in ("se", "ci_low", "ci_high")}


# ------------------------------------------------------------------------------------------ artifact


def write_resampling(path, result: Mapping[str, Any], record: Mapping[str, Any]) -> None:
    """One layer's ladder (a row per prefix), jackknife replicates and intervals, as columns of arrays."""
    datasets: dict[str, Any] = {}
    for part in ("ladder", "jackknife"):
        rows = result[part]
        names = sorted({key for row in rows for key in row})
        for name in names:
            datasets[f"{part}/{name}"] = np.asarray([row.get(name, math.nan) for row in rows], dtype=np.float64)
    for name, value in result["full"].items():
        datasets[f"full/{name}"] = np.asarray([value], dtype=np.float64)
    for name, parts in result["intervals"].items():
        datasets[f"intervals/{name}"] = np.asarray([parts["se"], parts["ci_low"], parts["ci_high"]])
    write_h5(path, datasets, {**record, "n_blocks": result["n_blocks"], "n_ladder": len(result["ladder"])})


def read_resampling(path, *, model: str | Mapping[str, Any], layer: int,
                    case_ids: Sequence[int] | None = None) -> dict[str, Any]:
    """What ``write_resampling`` stored (ladder and jackknife as lists of rows), checked against model, layer and
    the fact selection."""
    with open_h5(path, "resampling", "resampling") as f:
        attrs = get_attrs(f)
        check_artifact(attrs, path, "resampling file", "resampling", model, layer=layer)
        if case_ids is not None and list(attrs.get("case_ids", [])) != list(case_ids):
            raise ProvenanceError(f"{path} was computed for other facts than the current selection; rerun the "
                                  f"resampling rule")
        out: dict[str, Any] = {"attrs": attrs}
        for part in ("ladder", "jackknife"):
            columns = {name: f[part][name][()] for name in f[part]} if part in f else {}
            n = attrs["n_ladder"] if part == "ladder" else attrs["n_blocks"]
            out[part] = [{name: float(values[i]) for name, values in columns.items()} for i in range(n)]
        out["full"] = {name: float(f["full"][name][0]) for name in f["full"]}
        out["intervals"] = {name: dict(zip(("se", "ci_low", "ci_high"), (float(v) for v in f["intervals"][name][()])))
                            for name in f["intervals"]}
    return out
