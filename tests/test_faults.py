"""Damaged artifacts: a flipped or zeroed byte inside a dataset, or a truncated file, is an error naming the file
and saying how to rebuild it, never wrong numbers read back as valid (checksummed datasets, tests per artifact)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from superposition import keys, matrices, stats, whitening
from superposition.provenance import ProvenanceError

RECORD = {"model": "m", "layer": 0, "d_m": 8}


def _covariance(path):
    X = np.random.default_rng(0).standard_normal((40, 8))
    stats.write_covariance(path, X.T @ X / 40, 40, RECORD)
    return lambda: stats.read_covariance(path, model="m", layer=0, d_m=8), "C"


def _whitening(path):
    X = np.random.default_rng(1).standard_normal((40, 8))
    whitening.write_whitening(path, whitening.whiten(X.T @ X / 40), RECORD)
    return lambda: whitening.read_whitening(path, model="m", layer=0, d_m=8), "cholesky"


def _keys(path):
    K = np.random.default_rng(2).standard_normal((5, 2, 8)).astype(np.float32)
    keys.write_keys(path, K, [1, 2, 3, 4, 5], [0] * 5, ["x"] * 5, [False] * 5, [0, 1], {"model": "m"})
    return lambda: keys.read_keys(path, model="m", layer=0, d_m=8), "keys"


def _matrices(path):
    K = np.random.default_rng(3).standard_normal((5, 8))
    mats = matrices.superposition_matrices(K, np.eye(8))
    matrices.write_matrices(path, mats, [1, 2, 3, 4, 5], RECORD)
    return lambda: matrices.read_matrices(path, model="m", layer=0), "P"


def _stats(path):
    S = np.random.default_rng(4).standard_normal((8, 8))
    with h5py.File(path, "w") as f:  # the layout _save_sums writes, through the same checksummed create
        f.attrs.update({"model": "m", "d_m": 8, "corpus_fingerprint": "c", "shard": 0, "n_shards": 1,
                        "count": 3, "layers": "[0]", "segments": "[0]", "segment_blocks": "[0]",
                        "segment_tokens": "[3]"})
        f.create_dataset("layer_0/segment_sums", data=stats.pack_upper(S @ S.T)[None], fletcher32=True)
    return (lambda: stats.merge_layer([path], 0, model="m", d_m=8, corpus_fingerprint="c", n_shards=1),
            "layer_0/segment_sums")


def _shard(path):
    from superposition import corpus

    docs = [np.arange(n, dtype=np.int32) % 50 for n in (300, 500, 200)]
    corpus.write_shard(path, docs, ["a", "b", "c"], {"model": "m", "shard": 0})
    return lambda: corpus.read_shard(path, model="m"), "tokens"


def _kde(path):
    from superposition import summaries

    grid = np.linspace(-1, 1, 301)
    summaries.write_kdes(path, grid, {"P": {0: np.exp(-grid ** 2)}}, grid * 90, {"P": {0: np.ones(301)}},
                         {0: grid}, {"model": "m"})
    return lambda: summaries.read_kdes(path, model="m"), "P/layer_0"


REBUILT_BY = {"covariance": "covariance", "whitening": "whitening", "keys": "keys", "matrices": "matrices",
              "statistics": "activation_stats", "corpus shard": "corpus_shards", "density curves": "kde"}
ARTIFACTS = {"covariance": _covariance, "whitening": _whitening, "keys": _keys, "matrices": _matrices,
             "statistics": _stats, "corpus shard": _shard, "density curves": _kde}


def _damage_dataset(path, name, how):
    with h5py.File(path, "r") as f:
        info = f[name].id.get_chunk_info(0)
    offset, size = info.byte_offset, info.size
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[offset + size // 2] ^= 0xFF
    else:  # the data zeroed; Fletcher-32 keeps its 4-byte checksum at the chunk's end (zeroed too, it would pass)
        data[offset:offset + size - 4] = bytes(size - 4)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["flip", "zero"])
@pytest.mark.parametrize("kind", sorted(ARTIFACTS))
def test_a_damaged_dataset_is_an_error_naming_the_file(kind, how, tmp_path):
    path = tmp_path / f"{kind.replace(' ', '_')}.h5"
    read, dataset = ARTIFACTS[kind](path)
    read()  # intact: reads
    _damage_dataset(path, dataset, how)
    with pytest.raises(ProvenanceError, match=rf"{path} is damaged: reading it failed .*delete it and run snakemake "
                                              rf"again: the {REBUILT_BY[kind]} rule rebuilds it"):
        read()


@pytest.mark.parametrize("kind", sorted(ARTIFACTS))
def test_a_truncated_artifact_is_an_error_naming_the_file(kind, tmp_path):
    path = tmp_path / f"{kind.replace(' ', '_')}.h5"
    read, _ = ARTIFACTS[kind](path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ProvenanceError, match=rf"{path} is (corrupt or truncated|damaged).*: the {REBUILT_BY[kind]} "
                                              rf"rule rebuilds it"):
        read()


# ---- writes that cannot succeed: a clear error naming the file and the cause, and nothing under its name -------

FULL_DISK_JOB = """
import resource, signal, sys
import numpy as np
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))
from superposition import provenance, stats
kind, path = sys.argv[1], sys.argv[2]
if kind == "h5":
    stats.write_covariance(path, np.eye(64), 10, {"model": "m", "layer": 0})
else:
    provenance.write_json(path, {"x": "y" * 20000})
"""


@pytest.mark.parametrize("kind", ["h5", "json"])
def test_a_file_size_limit_is_a_clear_error_and_leaves_nothing(kind, tmp_path):
    import subprocess
    import sys

    target = tmp_path / f"artifact.{kind}"
    proc = subprocess.run([sys.executable, "-c", FULL_DISK_JOB, kind, str(target)], capture_output=True, text=True)
    assert proc.returncode != 0
    assert f"ArtifactWriteError: [Errno 27] cannot write {target}: the file exceeds the file-size limit" in proc.stderr
    assert not target.exists()


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder nothing can be written to: a read-only tmpfs as root (root ignores permissions), else mode 555."""
    import os
    import subprocess

    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() == 0:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)],
                                 capture_output=True, text=True)
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.strip()}")
        yield folder
        subprocess.run(["umount", str(folder)], capture_output=True)
    else:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)


def test_a_read_only_results_folder_is_a_clear_error(read_only_folder):
    from superposition.provenance import ArtifactWriteError, write_json

    with pytest.raises(ArtifactWriteError, match=r"cannot write .*covariance/m/layer-0\.h5: (the file system is "
                                                 r"read-only|permission denied)"):
        stats.write_covariance(read_only_folder / "covariance/m/layer-0.h5", np.eye(4), 10, RECORD)
    with pytest.raises(ArtifactWriteError, match="nothing was written under that name"):
        write_json(read_only_folder / "model.json", {"name": "m"})


def test_an_artifact_of_another_model_revision_is_refused_naming_field_values_and_rule(tmp_path):
    from superposition import models

    manifest = {"name": "m", "model_type": "llama", "n_layers": 2, "d_m": 4, "gguf_sha256": "new-weights"}
    stats.write_covariance(tmp_path / "c.h5", np.eye(4), 10,
                           {**models.provenance_of({**manifest, "gguf_sha256": "old-weights"}), "layer": 0})
    with pytest.raises(ProvenanceError, match=r"c\.h5: this covariance has model_revision = 'old-weights' but "
                                              r"'new-weights' was expected .* rerun the covariance rule"):
        stats.read_covariance(tmp_path / "c.h5", model=models.identity(manifest), layer=0, d_m=4)
    C, _ = stats.read_covariance(tmp_path / "c.h5", model=models.identity({**manifest, "gguf_sha256": "old-weights"}),
                                 layer=0, d_m=4)
    assert np.array_equal(C, np.eye(4))
    with pytest.raises(ProvenanceError, match="this covariance has layer = 0 but 1 was expected"):
        stats.read_covariance(tmp_path / "c.h5", model="m", layer=1, d_m=4)


def test_the_one_hdf5_writer_checksums_numbers_keeps_strings_and_compresses_on_request(tmp_path):
    from superposition.provenance import get_attrs, write_h5

    path = tmp_path / "a.h5"
    write_h5(path, {"x": np.arange(6.0), "g/ids": np.arange(3), "names": ["a", "bc"], "empty": np.zeros(0)},
             {"model": "m", "layer": 2}, compress=["x"])
    with h5py.File(path) as f:
        assert f["x"].fletcher32 and f["x"].compression == "gzip" and f["g/ids"].fletcher32
        assert not f["g/ids"].compression and [s.decode() for s in f["names"][()]] == ["a", "bc"]
        assert f["empty"].shape == (0,)
        assert get_attrs(f) == {"model": "m", "layer": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["a.h5"]  # no temporary file left beside it


@pytest.mark.parametrize("kind", ["model manifest", "fact selection"])
def test_a_damaged_json_artifact_is_an_error_naming_the_file(kind, tmp_path):
    from superposition import models
    from superposition.provenance import read_json, write_json

    path = tmp_path / f"{kind.replace(' ', '_')}.json"
    write_json(path, {"name": "m", "path": ".", "model_type": "llama", "n_layers": 2, "d_m": 4,
                      "selected": [1, 2, 3]})
    read = (lambda: models.read_manifest(path)) if kind == "model manifest" else (lambda: read_json(path))
    read()
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ProvenanceError, match=rf"{path}: not valid JSON"):
        read()
