import numpy as np
import pytest

from superposition import matrices, plots, summaries
from superposition.provenance import ProvenanceError


def test_excess_kurtosis_of_a_laplace_sample_is_about_three():
    sample = np.random.default_rng(0).laplace(size=100_000)
    assert summaries.excess_kurtosis(sample) == pytest.approx(3.0, abs=0.15)
    assert summaries.excess_kurtosis(np.random.default_rng(1).normal(size=100_000)) == pytest.approx(0.0, abs=0.05)


def test_kde_integrates_to_one_on_its_grid():
    values = np.random.default_rng(0).normal(0, 0.2, size=5000)
    grid = np.linspace(-1.5, 1.5, 601)
    density = summaries.kde(values, grid)
    assert np.trapezoid(density, grid) == pytest.approx(1.0, abs=1e-3)


def test_angles():
    assert summaries.angles_deg(np.array([0.0]))[0] == 90.0
    assert summaries.angles_deg(np.array([1.0, -1.0])).tolist() == [0.0, 180.0]
    d = summaries.describe_angles(np.array([0.0, 0.05, 0.5]))
    assert d["frac_within_5deg_of_90"] == pytest.approx(2 / 3)


def test_layer_row_has_every_column():
    rng = np.random.default_rng(0)
    K = rng.standard_normal((12, 20))
    X = rng.standard_normal((200, 20))
    from superposition.whitening import whiten

    mats = matrices.superposition_matrices(K, whiten(X.T @ X / 200).cholesky)
    row = summaries.layer_row(3, mats, 200)
    assert set(row) == set(summaries.columns())
    assert row["n_values"] == 12 * 11
    assert row["P_excess_kurtosis"] == summaries.excess_kurtosis(matrices.off_diagonal(mats["P"]))


def test_kurtosis_vs_m_skips_m_beyond_the_pool():
    rng = np.random.default_rng(0)
    K = rng.standard_normal((40, 10))
    L = np.linalg.cholesky(np.eye(10))
    out = summaries.kurtosis_vs_m(K, L, [16, 32, 64, 40])
    assert [m for m, _ in out] == [16, 32, 40]


def test_matrices_of_another_fact_selection_are_refused(tmp_path):
    mats = {name: np.eye(3) for name in ("G", "P", "Q", "W", "A")}
    path = tmp_path / "m.h5"
    matrices.write_matrices(path, mats, [1, 2, 3], {"model": "x", "layer": 0})
    matrices.read_matrices(path, model="x", layer=0, case_ids=[1, 2, 3])
    with pytest.raises(ProvenanceError, match="other facts than the current selection"):
        matrices.read_matrices(path, model="x", layer=0, case_ids=[1, 2, 4])


def test_figures_of_a_one_layer_model_are_written(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    P = rng.uniform(-1, 1, size=(8, 8))
    np.fill_diagonal(P, 1)
    plots.heatmap_grid({0: P}, "one-layer", tmp_path / "h.png", tmp_path / "h.pdf", 100)
    grid = np.linspace(-1.5, 1.5, 101)
    plots.kde_per_layer(grid, {0: np.exp(-grid**2)}, "one-layer", tmp_path / "k.png", None, 100)
    plots.kurtosis_vs_layer([("one-layer (1M)", np.array([0]), np.array([4.2]))], tmp_path / "s.png", None, 100)
    for name in ("h.png", "k.png", "s.png"):
        with Image.open(tmp_path / name) as image:
            image.load()
            assert image.size[0] >= 300 and image.size[1] >= 200
    assert (tmp_path / "h.pdf").read_bytes()[:4] == b"%PDF"


def test_interference_separation_matches_pair_counting():
    rng = np.random.default_rng(3)
    x = rng.exponential(size=40)
    x[5] = x[6]  # a tie across the groups counts one half
    forgotten = rng.random(40) < 0.3
    forgotten[5], forgotten[6] = True, False
    drop = 2 * x + rng.normal(scale=0.5, size=40)
    out = summaries.interference_separation(x, drop, forgotten)
    pairs = [(a > b) + 0.5 * (a == b) for a in x[forgotten] for b in x[~forgotten]]
    assert out["auc_forgotten_vs_kept"] == pytest.approx(np.mean(pairs), rel=1e-12)
    assert out["n_retained"] == 40 and out["n_forgotten"] == int(forgotten.sum())
    assert out["median_interference_forgotten"] == np.median(x[forgotten]) and out["max_interference"] == x.max()
    assert 0.5 < out["spearman_rho"] < 1
    # a monotone relation: rho 1; nothing forgotten: the AUC is undefined, not 0.5
    perfect = summaries.interference_separation(x, np.log(x), np.zeros(40, dtype=bool))
    assert perfect["spearman_rho"] == pytest.approx(1.0) and np.isnan(perfect["auc_forgotten_vs_kept"])
