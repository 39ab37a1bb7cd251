import numpy as np
import scipy.linalg
import pytest

from superposition import matrices, whitening


def spd(d, seed=0, n=None):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n or 4 * d, d))
    return X.T @ X / len(X)


@pytest.fixture
def setup():
    rng = np.random.default_rng(1)
    d, m = 40, 16
    C = spd(d)
    K = rng.standard_normal((m, d))
    K[5] = K[3]  # the same key twice (the same subject under two prompts that begin with it)
    w = whitening.whiten(C, layer=0)
    return C, K, w, matrices.superposition_matrices(K, w.cholesky)


def test_p_diagonal_is_one_and_identities_hold(setup):
    C, K, w, mats = setup
    P, G, W = mats["P"], mats["G"], mats["W"]
    np.testing.assert_array_equal(np.diag(P), np.ones(len(P)))
    np.testing.assert_allclose(P * P.T, W**2, rtol=1e-12, atol=1e-15)
    off = ~np.eye(len(P), dtype=bool)
    assert np.all(np.sign(P[off]) == np.sign(P.T[off]))
    ratio = G.diagonal()[None, :] / G.diagonal()[:, None]  # [i, j] = G_jj / G_ii
    np.testing.assert_allclose((P / P.T)[off], ratio[off], rtol=1e-10)
    assert not np.allclose(P, P.T)  # P is not symmetric


def test_identical_keys_give_p_exactly_one(setup):
    _, _, _, mats = setup
    assert mats["P"][3, 5] == 1.0 and mats["P"][5, 3] == 1.0


def test_w_is_cosine_of_explicitly_whitened_keys(setup):
    C, K, w, mats = setup
    inv_sqrt = scipy.linalg.fractional_matrix_power(C, -0.5).real  # C^{-1/2}, formed here only
    Z = K @ inv_sqrt  # rows C^{-1/2} k (C^{-1/2} is symmetric)
    Zn = Z / np.linalg.norm(Z, axis=1, keepdims=True)
    np.testing.assert_allclose(mats["W"], Zn @ Zn.T, rtol=0, atol=1e-10)
    Kn = K / np.linalg.norm(K, axis=1, keepdims=True)
    np.testing.assert_allclose(mats["A"], Kn @ Kn.T, rtol=0, atol=1e-12)


def test_agrees_with_a_naive_per_pair_loop(setup):
    C, K, w, mats = setup
    Cinv = np.linalg.inv(C)
    m = len(K)
    naive = np.empty((m, m))
    for i in range(m):
        for j in range(m):
            naive[i, j] = (K[i] @ Cinv @ K[j]) / (K[i] @ Cinv @ K[i])
    np.testing.assert_allclose(mats["P"], naive, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(mats["Q"], K @ K.T, rtol=1e-14)


def test_whitening_spectrum_and_cholesky_factor():
    C = spd(30, seed=3)
    w = whitening.whiten(C, layer=4)
    np.testing.assert_allclose(w.eigenvalues, np.linalg.eigvalsh(C), rtol=1e-10)
    np.testing.assert_allclose(w.cholesky @ w.cholesky.T, C, atol=1e-12)
    assert w.condition_number == pytest.approx(np.linalg.cond(C), rel=1e-8)


def test_singular_covariance_names_layer_and_smallest_eigenvalue():
    C = spd(30, seed=2, n=20)  # 20 tokens for width 30: rank 20
    with pytest.raises(whitening.SingularCovarianceError) as err:
        whitening.whiten(C, layer=7, n_tokens=20)
    text = str(err.value)
    assert "layer 7" in text and "smallest eigenvalue" in text and "fewer than its width 30" in text
    assert "more corpus documents" in text and "ridge" in text
    w = whitening.whiten(C, ridge=1e-3, layer=7)  # ridge makes it usable, and is recorded
    assert w.ridge == 1e-3 and w.eigenvalues[0] >= 1e-3 * (1 - 1e-9)


def test_top_pairs_are_off_diagonal_and_sorted():
    P = np.array([[1.0, 0.2, 0.9], [0.5, 1.0, -0.1], [0.3, 0.95, 1.0]])
    assert matrices.top_pairs(P, 3) == [(2, 1, 0.95), (0, 2, 0.9), (1, 0, 0.5)]
    assert len(matrices.top_pairs(P, 100)) == 6
    assert len(matrices.off_diagonal(P)) == 6


def test_a_zero_or_non_finite_key_is_named_not_turned_into_nan():
    rng = np.random.default_rng(3)
    K = rng.standard_normal((4, 6))
    L = np.linalg.cholesky(np.eye(6))
    for bad in (0.0, np.nan):
        K_bad = K.copy()
        K_bad[2] = bad
        with pytest.raises(matrices.DegenerateKeyError, match=r"1 key\(s\) are zero or not finite \(case_ids \[12\]\)"):
            matrices.superposition_matrices(K_bad, L, case_ids=[10, 11, 12, 13])
