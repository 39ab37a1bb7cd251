"""The convergence ladder, the jackknife and the verdict (superposition.resampling) on synthetic keys whose
distribution is known, so the resampling estimates are checked against Monte Carlo over independent corpora."""

import math

import numpy as np
import pytest

from superposition import resampling as rs
from superposition.stats import Segment, pack_upper, unpack_upper

D, M, BLOCKS = 6, 8, 8
_rng = np.random.default_rng(0)
_A = _rng.standard_normal((D, D))
SIGMA = _A @ _A.T / D + 0.3 * np.eye(D)  # the tokens' true second moment
KEYS = _rng.standard_normal((M, D))


def corpus(n_tokens, rng, d=D, sigma=SIGMA, blocks=BLOCKS):
    """Gaussian tokens with second moment ``sigma`` cut into equal blocks, as Segments (one per block)."""
    X = rng.standard_normal((n_tokens, d)) @ np.linalg.cholesky(sigma).T
    edges = np.linspace(0, n_tokens, blocks + 1).astype(int)
    return [Segment(b, b, int(edges[b + 1] - edges[b]), pack_upper(X[edges[b]:edges[b + 1]].T @ X[edges[b]:edges[b + 1]]))
            for b in range(blocks)], X


def resample(segments, keys=KEYS, d=D):
    return rs.layer_resampling(segments, keys, d_m=d, ridge=0.0, null_threshold=0.02, null_relative=1e-3, top_k=5,
                               confidence=0.95)


def test_prefix_and_leave_one_block_out_sums_are_those_of_their_tokens():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((900, D))
    cuts = [0, 40, 100, 250, 400, 650, 900]  # six segments in three blocks
    owner = [0, 0, 0, 1, 2, 2]
    segments = [Segment(s, owner[s], cuts[s + 1] - cuts[s], pack_upper(X[cuts[s]:cuts[s + 1]].T @ X[cuts[s]:cuts[s + 1]]))
                for s in range(6)]
    ladder, left_out, whole = rs.replicates(segments)
    assert whole.n_tokens == 900
    assert np.allclose(unpack_upper(whole.packed), X.T @ X, rtol=1e-12, atol=0)
    # the prefixes nearest 900, 450, 225, 112, 56: segments ending at 900, 400 (ln 400/450 beats 650), 250, 100, 40
    assert [rep.n_tokens for rep in ladder] == [40, 100, 250, 400, 900]
    for rep in ladder:
        assert np.allclose(unpack_upper(rep.packed), X[:rep.n_tokens].T @ X[:rep.n_tokens], rtol=1e-12, atol=1e-12)
    rows = {0: range(0, 250), 1: range(250, 400), 2: range(400, 900)}
    assert [rep.n_tokens for rep in left_out] == [900 - len(rows[b]) for b in range(3)]
    for block, rep in enumerate(left_out):
        keep = np.setdiff1d(np.arange(900), np.asarray(rows[block]))
        assert np.allclose(unpack_upper(rep.packed), X[keep].T @ X[keep], rtol=1e-12, atol=1e-12)
    # one block: no jackknife
    assert rs.replicates([Segment(0, 0, 5, segments[0].packed)])[1] == []


def test_jackknife_of_a_mean_is_the_classical_standard_error():
    # theta = mean of B equal block means; theta_-b = mean without block b: SE = sd(block means) / sqrt(B)
    means = np.random.default_rng(2).standard_normal(8)
    left_out = [(means.sum() - x) / 7 for x in means]
    out = rs.jackknife(left_out, float(means.mean()), confidence=0.95)
    assert out["se"] == pytest.approx(means.std(ddof=1) / math.sqrt(8), rel=1e-12)
    half = 2.364624251592785 * out["se"]  # Student's t, 7 degrees of freedom, 97.5%
    assert out["ci_low"] == pytest.approx(means.mean() - half) and out["ci_high"] == pytest.approx(means.mean() + half)
    assert math.isnan(rs.jackknife([1.0], 1.0)["se"]) and math.isnan(rs.jackknife([1.0, math.nan], 1.0)["se"])


def test_jackknife_standard_error_matches_the_spread_over_independent_corpora():
    """Monte Carlo: the spread of each statistic over R independent corpora of N Gaussian tokens, against the
    mean jackknife SE of single corpora and the coverage of their 95% intervals around the statistic of the true
    second moment. Tolerances from R and B: the Monte-Carlo SD's relative error is 1/sqrt(2(R-1)) (6.5%), the
    mean SE's sqrt(1/(2(B-1))/R) (2.4%); three of their combined SDs, and 3 binomial SDs for the coverage."""
    R, N = 120, 2000
    rng = np.random.default_rng(3)
    names = ("P_std", "W_angle_mean_deg", "P_mean")
    truth = rs.statistics_of(KEYS, SIGMA)[0]
    full, se, covered = {n: [] for n in names}, {n: [] for n in names}, {n: [] for n in names}
    for _ in range(R):
        segments, _ = corpus(N, rng)
        _, left_out, whole = rs.replicates(segments)
        estimate = rs.statistics_of(KEYS, unpack_upper(whole.packed) / whole.n_tokens)[0]
        replicate_stats = [rs.statistics_of(KEYS, unpack_upper(rep.packed) / rep.n_tokens)[0] for rep in left_out]
        for name in names:
            interval = rs.jackknife([r[name] for r in replicate_stats], estimate[name])
            full[name].append(estimate[name])
            se[name].append(interval["se"])
            covered[name].append(interval["ci_low"] <= truth[name] <= interval["ci_high"])
    tolerance = 3 * math.sqrt(1 / (2 * (R - 1)) + 1 / (2 * (BLOCKS - 1)) / R)
    for name in names:
        ratio = np.mean(se[name]) / np.std(full[name], ddof=1)
        assert abs(ratio - 1) < tolerance, (name, ratio, tolerance)
        assert np.mean(covered[name]) >= 0.95 - 3 * math.sqrt(0.95 * 0.05 / R), (name, np.mean(covered[name]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_verdict_flips_when_the_corpus_is_too_small(seed):
    """24-dimensional keys: 100,000 tokens converge; 48 tokens (2 per dimension, C from 24 at the last halving)
    do not, for the spread of P. The whitening angle is the robust one: it converges at either size here."""
    d = 24
    rng = np.random.default_rng(0)
    A = rng.standard_normal((d, d))
    sigma = A @ A.T / d + 0.3 * np.eye(d)
    keys = rng.standard_normal((M, d))
    verdicts = {}
    for n_tokens in (48, 100_000):
        segments, _ = corpus(n_tokens, np.random.default_rng(seed), d=d, sigma=sigma)
        result = resample(segments, keys, d)
        n = [row["n_tokens"] for row in result["ladder"]]
        verdicts[n_tokens] = rs.converged_from(n, [row["P_std"] for row in result["ladder"]], 0.05)
    assert verdicts[100_000]["reached"] and verdicts[100_000]["converged_from_tokens"] <= 100_000
    assert not verdicts[48]["reached"] and verdicts[48]["last_doubling_change"] >= 0.05


def test_converged_from_reads_the_doubling_ladder():
    n = [100, 200, 400, 800, 1600]
    # changes over each doubling: -, 50%, 10%, 4%, 1%: converged from 800 on
    values = [1.0, 2.0, 2.222, 2.3145, 2.338]
    changes = rs.doubling_changes(n, values)
    assert math.isnan(changes[0]) and changes[1] == pytest.approx(0.5)
    verdict = rs.converged_from(n, values, 0.05)
    assert verdict == {"converged_from_tokens": 800, "reached": True,
                       "last_doubling_change": pytest.approx(abs(2.338 - 2.3145) / 2.338)}
    # the last doubling moved it: not reached, whatever came before
    assert rs.converged_from(n, [1.0, 1.0, 1.0, 1.0, 2.0], 0.05)["reached"] is False
    # a singular C at the half (NaN statistic) is not converged
    assert rs.converged_from(n, [1.0, 1.0, 1.0, math.nan, 1.0], 0.05)["reached"] is False
    # no point near half of the last: no verdict
    assert rs.converged_from([100, 900], [1.0, 1.0], 0.05)["converged_from_tokens"] is None


def test_ladder_statistics_are_of_the_prefix_c():
    """Each ladder row is the statistics of C formed from exactly its prefix of tokens (recomputed here from the
    tokens), and the last row is the whole corpus: distances 0, overlap 1."""
    segments, X = corpus(4000, np.random.default_rng(4))
    result = resample(segments)
    for row in result["ladder"]:
        n = int(row["n_tokens"])
        direct = rs.statistics_of(KEYS, X[:n].T @ X[:n] / n)[0]
        for name in rs.C_STATISTICS:
            assert row[name] == pytest.approx(direct[name], rel=1e-9, abs=1e-12), (n, name)
        eigenvalues = np.linalg.eigvalsh(X[:n].T @ X[:n] / n)
        assert row["min_eigenvalue"] == pytest.approx(eigenvalues[0], rel=1e-9)
        assert row["condition_number"] == pytest.approx(eigenvalues[-1] / eigenvalues[0], rel=1e-9)
    last = result["ladder"][-1]
    assert last["n_tokens"] == 4000 and last["C_relative_change"] == 0 and last["P_relative_change"] == 0
    assert last["top_pairs_overlap"] == 1
    assert [row["n_tokens"] for row in result["ladder"]] == [500, 1000, 2000, 4000]
    assert result["n_blocks"] == BLOCKS and set(result["intervals"]) == set(rs.C_STATISTICS)


def test_a_singular_prefix_gives_undefined_statistics_not_an_error():
    segments, _ = corpus(40, np.random.default_rng(5))  # blocks of 5 tokens in 6 dimensions
    assert math.isnan(rs.statistics_of(KEYS, unpack_upper(segments[0].packed) / 5)[0]["P_std"])
    with pytest.raises(ValueError, match="differs from the matrices' P"):
        segments, _ = corpus(4000, np.random.default_rng(6))
        resample_with = rs.layer_resampling
        resample_with(segments, KEYS, d_m=D, ridge=0.0, null_threshold=0.02, null_relative=1e-3, top_k=5,
                      confidence=0.95, P_full=np.eye(M))


def test_statistics_files_without_segments_and_inconsistent_blocks_are_refused(tmp_path):
    import h5py

    from superposition import stats
    from superposition.provenance import ProvenanceError

    S = pack_upper(np.eye(3))[None]
    common = {"model": "m", "d_m": 3, "corpus_fingerprint": "c", "n_shards": 2, "count": 3, "layers": "[0]"}
    old = tmp_path / "old.h5"
    with h5py.File(old, "w") as f:  # the layout before segments: one full sum
        f.attrs.update({**common, "shard": 0})
        f.create_dataset("layer_0/sum", data=np.eye(3))
    kw = dict(model="m", d_m=3, corpus_fingerprint="c", n_shards=1)
    with pytest.raises(ProvenanceError, match="old.h5 holds no segment sums .* rerun activation_stats"):
        stats.read_segments([old], 0, **kw)
    paths = []
    for shard, block in enumerate([0, 1]):  # segment 4 said to be in block 0 by one shard, block 1 by the other
        paths.append(tmp_path / f"s{shard}.h5")
        with h5py.File(paths[-1], "w") as f:
            f.attrs.update({**common, "shard": shard, "segments": "[4]", "segment_blocks": f"[{block}]",
                            "segment_tokens": "[3]"})
            f.create_dataset("layer_0/segment_sums", data=S)
    with pytest.raises(ProvenanceError, match="s1.h5: segment 4 is in block 1 here and 0 in another shard"):
        stats.read_segments(paths, 0, **{**kw, "n_shards": 2})
    with h5py.File(paths[0], "a") as f:  # its record says d_m 4, its sums are of width 3
        f.attrs["d_m"] = 4
    with pytest.raises(ProvenanceError, match=r"has shape \(1, 6\) float64, expected \(1, 10\) float64 \(d_m = 4\)"):
        stats.read_segments(paths[:1], 0, **{**kw, "d_m": 4, "n_shards": 1})


def test_a_singular_whole_corpus_and_another_selection_are_named(tmp_path):
    from superposition.provenance import ProvenanceError

    segments, _ = corpus(16, np.random.default_rng(7), blocks=2)  # 16 tokens would do, 4 in rank-deficient form:
    rank_two = [Segment(s.id, s.block, s.count, pack_upper(np.diag([1.0, 1.0, 0, 0, 0, 0]) * s.count))
                for s in segments]
    with pytest.raises(np.linalg.LinAlgError, match="C of the whole corpus \\(16 tokens, d_m = 6\\) is not positive "
                                                   "definite: set whitening.ridge > 0"):
        resample(rank_two)
    segments, _ = corpus(800, np.random.default_rng(8))
    result = resample(segments)
    path = tmp_path / "r.h5"
    rs.write_resampling(path, result, {"model": "m", "layer": 2, "case_ids": [1, 2, 3]})
    back = rs.read_resampling(path, model="m", layer=2, case_ids=[1, 2, 3])
    assert all(back["intervals"][k] == pytest.approx(v) for k, v in result["intervals"].items())
    assert back["full"] == pytest.approx(result["full"])
    assert [row["n_tokens"] for row in back["ladder"]] == [row["n_tokens"] for row in result["ladder"]]
    with pytest.raises(ProvenanceError, match="r.h5 was computed for other facts than the current selection; rerun "
                                              "the resampling rule"):
        rs.read_resampling(path, model="m", layer=2, case_ids=[1, 2, 4])
    with pytest.raises(ProvenanceError, match="layer = 2 but 3 was expected"):
        rs.read_resampling(path, model="m", layer=3)


def test_the_whole_corpus_spectrum_given_is_the_one_computed():
    segments, X = corpus(3000, np.random.default_rng(9))
    C = X.T @ X / 3000
    given = resample(segments)
    reused = rs.layer_resampling(segments, KEYS, d_m=D, ridge=0.0, null_threshold=0.02, null_relative=1e-3,
                                 top_k=5, confidence=0.95, full_eigenvalues=np.linalg.eigvalsh(C))
    for name in ("min_eigenvalue", "max_eigenvalue", "condition_number"):
        assert reused["ladder"][-1][name] == pytest.approx(given["ladder"][-1][name], rel=1e-10)
    assert reused["ladder"][-1]["P_std"] == given["full"]["P_std"]


def test_the_resampling_job_refuses_keys_or_whitening_that_are_not_its_statistics(tiny_run, tmp_path):
    """The job's own checks on a finished tiny run: keys of another selection, whitening of another ridge; and the
    summaries job's check that the jackknife's estimate is of its matrices."""
    import json
    import shutil

    from superposition import whitening as whitening_mod
    from superposition.jobs.resampling import resampling
    from superposition.jobs.summaries import summaries
    from superposition.provenance import ProvenanceError

    tmp, _ = tiny_run
    res = tmp / "results"
    stats_files = sorted(str(p) for p in (res / "stats/tiny").glob("shard-*.h5"))
    cfg = {"null_space_threshold": 0.02, "null_space_relative": 1e-3, "top_pairs": 5, "confidence": 0.95}
    args = dict(model_json=str(res / "models/tiny/model.json"), corpus_manifest=str(res / "corpus/tiny/manifest.json"),
                stats_paths=stats_files, keys_path=str(res / "keys/tiny.h5"),
                whitening_path=str(res / "whitening/tiny/layer-1.h5"), selection_path=str(res / "facts/selection.json"),
                layer=1, ridge=0.0, cfg=cfg, out_h5=str(tmp_path / "r.h5"))
    selection = json.loads((res / "facts/selection.json").read_text())
    other = tmp_path / "selection.json"
    other.write_text(json.dumps({**selection, "selected": selection["selected"][::-1]}))
    with pytest.raises(ProvenanceError, match="keys/tiny.h5 holds keys of other facts than .*selection.json selects; "
                                              "rerun keys"):
        resampling(**{**args, "selection_path": str(other)})
    w, attrs = whitening_mod.read_whitening(args["whitening_path"], model="tiny", layer=1, d_m=48)
    ridged = tmp_path / "whitening.h5"
    whitening_mod.write_whitening(ridged, whitening_mod.Whitening(w.eigenvalues, w.cholesky, 0.5), attrs)
    with pytest.raises(ProvenanceError, match="whitening.h5 is of another corpus or ridge than the statistics; rerun "
                                              "whitening"):
        resampling(**{**args, "whitening_path": str(ridged)})
    # a resampling file whose whole-corpus estimate is not the matrices' (here: of layer 1, given for layer 0)
    shutil.copy(res / "resampling/tiny/layer-1.h5", tmp_path / "layer-0.h5")
    import h5py

    with h5py.File(tmp_path / "layer-0.h5", "a") as f:
        f.attrs["layer"] = 0
    with pytest.raises(ProvenanceError, match="layer-0.h5: P excess kurtosis .* differs from the matrices' .*; rerun "
                                              "resampling"):
        summaries(str(res / "models/tiny/model.json"), [str(res / "matrices/tiny/layer-0.h5")], [0],
                  str(res / "facts/selection.json"), str(tmp_path / "layers.tsv"), [str(tmp_path / "layer-0.h5")])
