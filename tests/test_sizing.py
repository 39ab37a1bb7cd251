"""superposition.sizing: job sizes from the model's size, and the plans that cannot fit one GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from superposition import sizing

REPO = Path(__file__).resolve().parents[1]
LLAMA_13B = sizing.ModelSize("llama-2-13b", 13016e6, 40, 13824, "config")
PAPER_STATS = sizing.StatsSettings("bfloat16", "float32", 16384)


def test_gpu_bytes_add_up_from_the_model_shape():
    need = sizing.stats_gpu_bytes(LLAMA_13B, 10, PAPER_STATS)
    assert need["weights"] == 13016e6 * 2
    assert need["accumulators"] == 10 * 13824**2 * 8  # float64 sums, one per layer of the block
    assert need["gram"] == 13824**2 * 4 and need["keys"] == 3 * 16384 * 13824 * 4
    assert need["total"] == sum(v for k, v in need.items() if k != "total")
    # one more layer costs exactly one more float64 accumulator
    assert sizing.stats_gpu_bytes(LLAMA_13B, 11, PAPER_STATS)["total"] - need["total"] == 13824**2 * 8


def test_largest_block_is_the_boundary_of_the_check():
    gpu = 80 * sizing.GB
    n = sizing.largest_block(LLAMA_13B, gpu, PAPER_STATS)
    assert 0 < n < 40
    assert sizing.stats_gpu_bytes(LLAMA_13B, n, PAPER_STATS)["total"] <= gpu
    assert sizing.stats_gpu_bytes(LLAMA_13B, n + 1, PAPER_STATS)["total"] > gpu
    sizing.check_blocks(LLAMA_13B, {"0-9": 10, f"10-{9 + n}": n}, 80, PAPER_STATS)


def test_a_block_that_cannot_fit_is_refused_naming_model_block_bytes_and_the_size_that_fits():
    need = sizing.stats_gpu_bytes(LLAMA_13B, 40, PAPER_STATS)["total"]
    fits = sizing.largest_block(LLAMA_13B, 40 * sizing.GB, PAPER_STATS)
    with pytest.raises(sizing.SizingError) as err:
        sizing.check_blocks(LLAMA_13B, {"0-39": 40}, 40, PAPER_STATS)
    text = str(err.value)
    assert "llama-2-13b" in text and "block 0-39" in text and f"{need:,} bytes" in text
    assert f"layer_block_size: {fits}" in text and "40,000,000,000 bytes" in text
    # float32 weights of 13B do not leave room for even one layer on a 40 GB GPU
    with pytest.raises(sizing.SizingError, match="even one layer does not fit"):
        sizing.check_blocks(LLAMA_13B, {"0": 1}, 40, sizing.StatsSettings("float32"))


def test_sizes_come_from_the_snapshot_before_the_config_and_estimates_err_large():
    manifest = {"n_layers": 40, "d_m": 13824, "n_params": 13_015_864_320}
    size = sizing.model_size("m", params_millions=13016, n_layers=40, manifest=manifest)
    assert (size.d_m, size.params, size.d_m_from, size.exact) == (13824, 13_015_864_320, "snapshot", True)
    assert sizing.model_size("m", params_millions=13016, n_layers=40, config_d_m=13824).d_m_from == "config"
    estimate = sizing.model_size("m", params_millions=13016, n_layers=40)
    assert not estimate.exact and estimate.d_m >= 13824  # the estimate is on the safe side for Llama ...
    gpt2 = sizing.model_size("gpt2", params_millions=124, n_layers=12)
    assert gpt2.d_m >= 3072  # ... and for GPT-2 (d_m 3072)
    with pytest.raises(sizing.SizingError, match="set models.m.params_millions"):
        sizing.model_size("m", params_millions=None, n_layers=4)


def test_bigger_models_and_blocks_get_more_memory_and_time():
    small = sizing.ModelSize("s", 124e6, 12, 3072)
    tokens = 10_000_000
    a, b = sizing.stats_job(small, 12, tokens), sizing.stats_job(LLAMA_13B, 10, tokens)
    assert b["mem_mb"] > a["mem_mb"] and b["runtime"] > a["runtime"]
    assert sizing.stats_job(LLAMA_13B, 10, 2 * tokens)["runtime"] > b["runtime"]
    assert sizing.stats_job(small, 1, 1)["runtime"] == sizing.MIN_RUNTIME_MIN
    layers = sizing.layer_jobs(LLAMA_13B, 8)
    assert layers["whitening"]["mem_mb"] * 1e6 >= 6 * 13824**2 * 8  # eigh's copies of a float64 d_m x d_m
    assert sizing.shard_tokens({"n_documents": 100, "max_length": 50}, 4) == 1250
    assert sizing.shard_tokens({"n_documents": 100}, 4, corpus_manifest={"corpus_tokens": 1001}) == 251
    assert sizing.shard_tokens({"n_documents": 100, "n_tokens": 10_001}, 4) == 2501  # a budget decides


@pytest.mark.parametrize("tokens, blocks, d_m", [(52_879, 8, 1536), (1_070_000, 8, 1536), (52_025, 8, 2048),
                                                  (5_000, 8, 2048), (900, 1, 48), (10**9, 10, 13824)])
def test_the_segment_count_is_the_one_the_corpus_cuts(tokens, blocks, d_m):
    from superposition import corpus

    assert sizing.n_segments(tokens, blocks, d_m) == len(corpus.segment_targets(tokens, blocks, d_m)[0]) + 1


def test_kept_corpus_segments_cost_host_memory_of_one_segment_only():
    """Finished segments go to their own files (stats.FinishedSegments): host memory grows by one packed segment
    (d_m^2 / 2 float64 per layer), not by the 21 segments a billion tokens of Llama-2-13B are cut into."""
    wide = sizing.ModelSize("wide", 1e9, 40, 13824, "config")  # its float64 sums outweigh its weights on the host
    one, eight, many = (sizing.stats_job(wide, 10, tokens, sizing.StatsSettings(corpus_blocks=b))
                        for b, tokens in ((1, 10**9), (8, 10**9), (8, 10**10)))
    assert sizing.n_segments(10**9, 8, 13824) == 21
    assert eight["mem_mb"] - one["mem_mb"] == pytest.approx(10 * 13824**2 * 4 / 1e6, abs=100)
    assert many["mem_mb"] == eight["mem_mb"]
