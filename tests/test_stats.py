import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from superposition import models, stats
from superposition.provenance import ProvenanceError

from conftest import FAMILIES, tiny_model


def random_docs(n_docs=24, seed=0, vocab=101, max_len=30):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=int(rng.integers(3, max_len)), dtype=np.int32) for _ in range(n_docs)]


def reference_second_moments(model, docs, layers):
    """Materialise every key of every document, one document at a time (no padding): K^T K / N in float64.
    A batch of one document holds (1, seq, d_m) keys, or (seq, d_m) where the block flattens them (OPT)."""
    keys = {layer: [] for layer in layers}
    handles = [models.key_module(model, layer).register_forward_pre_hook(
        lambda m, a, layer=layer: keys[layer].append(a[0].reshape(-1, a[0].shape[-1]).double())) for layer in layers]
    with torch.no_grad():
        for doc in docs:
            model(input_ids=torch.as_tensor(doc, dtype=torch.long)[None])
    for h in handles:
        h.remove()
    out = {}
    for layer in layers:
        K = torch.cat(keys[layer]).numpy()
        out[layer] = (K.T @ K / len(K), len(K))
    return out


def run(model, docs, layers, path, **kw):
    """collect_second_moments with StatsOptions' fields (the schema's defaults for the rest) among ``kw``."""
    kw.setdefault("progress", False)
    fields = set(stats.StatsOptions.__dataclass_fields__)
    options = stats.StatsOptions.from_config(**{k: kw.pop(k) for k in list(kw) if k in fields})
    return stats.collect_second_moments(model, docs, layers, path, {"model": "tiny", "d_m": 64}, pad_id=0,
                                        options=options, **kw)


def read_segment_sums(path):
    """The stored per-segment sums of every layer, as written (for bit-for-bit comparisons), and the segments."""
    with h5py.File(path) as f:
        return {k: f[k]["segment_sums"][()] for k in f}, json.loads(f.attrs["segments"])


def read_sums(path):
    """Each layer's sum over every segment of a statistics file (as "layer_<l>"), and the token count."""
    sums, count = stats.shard_sums(path)
    return {f"layer_{layer}": S for layer, S in sums.items()}, count


@pytest.mark.parametrize("gram_tokens", [None, 0, 37])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_second_moment_matches_float64_reference(model_type, gram_tokens, tmp_path):
    # A float64 model makes batched and one-by-one keys equal to round-off, so the comparison isolates the
    # accumulation (masking, padding, merging) from float32 matmul-shape effects.
    model = tiny_model(model_type).double()
    docs = random_docs()
    layers = [0, 1, 2]
    # Padded batches of several documents (max_tokens small forces many batches with padding).
    assert any(len(set(len(docs[i]) for i in b)) > 1 for b in stats.token_batches([len(d) for d in docs], 120, 5))
    # gram_tokens: 2,048 on the CPU (one Gram at the end here), each batch's own, or every few batches
    summary = run(model, docs, layers, tmp_path / "s.h5", max_tokens=120, max_batch=5, gram_dtype="float64",
                  gram_tokens=gram_tokens, checkpoint_every=4)
    assert summary["gram_tokens"] == (2048 if gram_tokens is None else gram_tokens)
    sums, count = read_sums(tmp_path / "s.h5")
    ref = reference_second_moments(model, docs, layers)
    assert count == summary["n_tokens"] == sum(len(d) for d in docs) == ref[0][1]
    # Gemma-2's eager attention takes its softmax in float32 even in a float64 model: padded and unpadded rows then
    # differ at float32 round-off (measured 3e-9 relative), far below what a masking or merging error gives
    tolerance = 1e-7 if model_type == "gemma2" else 1e-10
    for layer in layers:
        C = sums[f"layer_{layer}"] / count
        assert np.linalg.norm(C - ref[layer][0]) <= tolerance * np.linalg.norm(ref[layer][0])


@pytest.mark.parametrize("gram_tokens", [None, 0])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_a_document_longer_than_a_batch_is_a_batch_of_its_own_whole(model_type, gram_tokens, tmp_path, capsys):
    # 60 and 45 tokens against a 16-position batch limit (the tiny models' context is 64), between short documents
    model = tiny_model(model_type).double()
    rng = np.random.default_rng(1)
    docs = random_docs(10, max_len=8)
    docs[3] = rng.integers(0, 101, size=60, dtype=np.int32)
    docs[7] = rng.integers(0, 101, size=45, dtype=np.int32)
    plan = stats.token_batches([len(d) for d in docs], 16, 5)
    assert plan[:2] == [[3], [7]] and sorted(i for b in plan for i in b) == list(range(10))
    assert all(len(docs[b[0]]) * len(b) <= 16 for b in plan[2:])
    layers = [0, 2]
    summary = run(model, docs, layers, tmp_path / "s.h5", max_tokens=16, max_batch=5, gram_dtype="float64",
                  gram_tokens=gram_tokens)
    assert "2 documents are longer than stats.max_tokens_per_batch = 16 (the longest 60 tokens)" in \
        capsys.readouterr().out
    assert summary["longest_batch_positions"] == 60 and summary["n_batches"] == len(plan)
    assert summary["attention_implementation"] == model.config._attn_implementation
    sums, count = read_sums(tmp_path / "s.h5")
    ref = reference_second_moments(model, docs, layers)
    assert count == sum(len(d) for d in docs) == ref[0][1]  # every key once: none cut, none twice
    tolerance = 1e-7 if model_type == "gemma2" else 1e-10  # as in the float64 reference test above
    for layer in layers:
        C = sums[f"layer_{layer}"] / count
        assert np.linalg.norm(C - ref[layer][0]) <= tolerance * np.linalg.norm(ref[layer][0])
    # the long documents alone, each its own batch, add up to the same sums as the reference of the two
    alone = run(model, [docs[3], docs[7]], layers, tmp_path / "a.h5", max_tokens=16, gram_dtype="float64")
    assert alone["n_batches"] == 2 and alone["n_tokens"] == 105


def panel_sums(panel: int, path: str, transpose_rows, monkeypatch):
    """Float64 sums of layers 0 and 2 over forward batches whose keys wait for a Gram of 100 tokens, the batch Gram
    in ``panel``-row block rows, added by numpy (the CPU's path) or torch (the GPU's, run here on the CPU)."""
    monkeypatch.setattr(stats, "GRAM_PANEL", (panel, panel))
    monkeypatch.setattr(stats, "TRANSPOSE_ROWS", (transpose_rows, transpose_rows))
    model = tiny_model("llama").double()
    docs = random_docs()
    accumulator = stats.GramAccumulator(model, [0, 2], "float64", gram_tokens=100)
    for gram in accumulator.grams.values():
        assert gram.numpy_add  # on the CPU by default
        gram.numpy_add = path == "cpu-add"
    with accumulator:
        for index, batch in enumerate(stats.token_batches([len(d) for d in docs], 120, 64)):
            accumulator.add_batch(*stats.pad_batch([docs[i] for i in batch], 0), index)
    return model, docs, accumulator


@pytest.mark.parametrize("panel", [16, 24, 64])
@pytest.mark.parametrize("path, transpose_rows", [("cpu-add", 7), ("torch-add", None)])
def test_gram_by_upper_panels_equals_reference(panel, path, transpose_rows, monkeypatch):
    """The batch Gram as block rows of its upper triangle (d_m = 64: 4 panels, 3 with a short one, or 1) over keys
    gathered from several forward batches, laid out as keys^T in tiles (the CPU's) or whole chunks (the GPU's)."""
    model, docs, accumulator = panel_sums(panel, path, transpose_rows, monkeypatch)
    ref = reference_second_moments(model, docs, [0, 2])
    for layer, S in accumulator.symmetric_sums().items():
        assert np.array_equal(S, S.T)
        assert np.linalg.norm(S / accumulator.count - ref[layer][0]) <= 1e-10 * np.linalg.norm(ref[layer][0])


@pytest.mark.parametrize("path", ["cpu-add", "torch-add"])
def test_the_transpose_layout_does_not_change_a_bit_of_the_sums(path, monkeypatch):
    """Tiles of any size or whole chunks only move the keys: the same bytes (stats.TRANSPOSE_ROWS differs by device)."""
    sums = {rows: panel_sums(24, path, rows, monkeypatch)[2].symmetric_sums() for rows in (7, 128, None)}
    for rows in (128, None):
        assert all(np.array_equal(sums[rows][layer], sums[7][layer]) for layer in (0, 2)), rows


def test_an_accumulator_is_freed_when_its_last_reference_goes():
    """No reference cycle outlives the `with` block: the sums go with the accumulator, without the cycle collector
    (on a GPU, sums left to it ran a Llama-2-7B shape out of memory on its fifth pass in one process)."""
    import gc
    import weakref

    model = tiny_model("llama")
    docs = random_docs()
    gc.collect()
    gc.disable()
    try:
        accumulator = stats.GramAccumulator(model, [0, 2], "float32")
        with accumulator:
            accumulator.add_batch(*stats.pad_batch(docs[:3], 0), 0)
        sums = [weakref.ref(tensor) for tensor in accumulator.sums.values()]
        del accumulator
        assert [ref() for ref in sums] == [None, None]
    finally:
        gc.enable()


def test_float32_batch_gram_is_close_to_reference(tmp_path):
    model = tiny_model("llama")
    docs = random_docs()
    run(model, docs, [1], tmp_path / "s.h5", max_tokens=200, gram_dtype="float32")
    sums, count = read_sums(tmp_path / "s.h5")
    ref = reference_second_moments(model, docs, [1])[1][0]
    assert np.linalg.norm(sums["layer_1"] / count - ref) <= 1e-5 * np.linalg.norm(ref)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_the_pad_id_does_not_change_a_bit_of_the_sums(model_type, tmp_path):
    """The statistics jobs pad with the config's id (models.pad_token_id, no tokenizer loaded): right padding puts
    every pad after the real tokens, so any id gives the same float32 keys and sums."""
    model = tiny_model(model_type)
    docs = random_docs(n_docs=10)
    for pad_id, name in ((models.pad_token_id(model.config), "config.h5"), (57, "other.h5")):
        stats.collect_second_moments(model, docs, [0, 2], tmp_path / name, {"model": "tiny"}, pad_id=pad_id,
                                     options=stats.StatsOptions.from_config(max_tokens=10**6,
                                                                             batch_overhead_tokens=10**9),
                                     progress=False)
    config, other = read_segment_sums(tmp_path / "config.h5")[0], read_segment_sums(tmp_path / "other.h5")[0]
    assert models.pad_token_id(model.config) != 57 and config.keys() == other.keys()
    for key in config:
        assert np.array_equal(config[key], other[key]), key


def test_pad_tokens_never_count(tmp_path):
    """Two very different batch plans (one document per batch vs everything padded together) agree."""
    model = tiny_model("gpt2").double()
    docs = random_docs(n_docs=10)
    run(model, docs, [0, 2], tmp_path / "a.h5", max_tokens=1, gram_dtype="float64")  # one doc per batch, no pad
    run(model, docs, [0, 2], tmp_path / "b.h5", max_tokens=10**6, batch_overhead_tokens=10**9,
        gram_dtype="float64")  # one padded batch
    (a, na), (b, nb) = read_sums(tmp_path / "a.h5"), read_sums(tmp_path / "b.h5")
    assert na == nb == sum(len(d) for d in docs)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-10, atol=1e-12)


def test_forward_stops_after_last_requested_layer(tmp_path):
    model = tiny_model("llama", n_layers=3)
    calls = []
    model.lm_head.register_forward_hook(lambda *a: calls.append("head"))
    models.blocks(model)[2].register_forward_hook(lambda *a: calls.append("block2"))
    run(model, random_docs(4), [0, 1], tmp_path / "s.h5")
    assert calls == []


@pytest.mark.parametrize("n_shards", [2, 4])
def test_sharded_merge_is_exact(n_shards, tmp_path):
    from superposition.corpus import split_shards

    # float64 model: in float32, regrouping documents into other batches changes the activations themselves at
    # the 1e-7 level (matmul shapes), which is not what this test is about.
    model = tiny_model("gpt_neox").double()
    docs = random_docs(n_docs=16)
    record = {"model": "tiny", "d_m": 64, "corpus_fingerprint": "fp"}
    stats.collect_second_moments(model, docs, [0, 1], tmp_path / "one.h5", {**record, "shard": 0}, pad_id=0,
                                 progress=False, options=stats.StatsOptions.from_config(gram_dtype="float64"))
    paths = []
    for i, part in enumerate(split_shards(len(docs), n_shards)):
        path = tmp_path / f"shard{i}.h5"
        stats.collect_second_moments(model, [docs[j] for j in part], [0, 1], path, {**record, "shard": i},
                                     pad_id=0, progress=False,
                                     options=stats.StatsOptions.from_config(gram_dtype="float64"))
        paths.append(path)
    for layer in [0, 1]:
        whole, n_whole, _ = stats.merge_layer([tmp_path / "one.h5"], layer, model="tiny", d_m=64,
                                              corpus_fingerprint="fp", n_shards=1)
        merged, n_merged, _ = stats.merge_layer(paths, layer, model="tiny", d_m=64, corpus_fingerprint="fp",
                                                n_shards=n_shards)
        assert n_whole == n_merged
        rel = np.linalg.norm(whole / n_whole - merged / n_merged) / np.linalg.norm(whole / n_whole)
        assert rel <= 1e-12


def test_every_prefix_of_segments_equals_the_second_moment_of_its_documents(tmp_path):
    """The convergence ladder's C: the segments of the first k (cut by corpus.document_segments, split over two
    shards, one segment straddling them) summed equal C of exactly those documents computed directly."""
    from superposition import corpus

    model = tiny_model("llama").double()
    docs = random_docs(n_docs=30, seed=5)
    lengths = [len(d) for d in docs]
    total = sum(lengths)
    targets, block_targets = corpus.segment_targets(total, 3, d_m=40)
    assert block_targets == [round(total / 3), round(2 * total / 3)] and len(targets) > len(block_targets)
    record = {"model": "tiny", "d_m": 64, "corpus_fingerprint": "fp"}
    paths, cut = [], 17
    for shard, (part, offset) in enumerate([(range(0, cut), 0), (range(cut, 30), sum(lengths[:cut]))]):
        seg, blk = corpus.document_segments([lengths[i] for i in part], offset, targets, block_targets)
        paths.append(tmp_path / f"s{shard}.h5")
        stats.collect_second_moments(model, [docs[i] for i in part], [0, 2], paths[-1], {**record, "shard": shard},
                                     pad_id=0, progress=False, segments=seg, segment_blocks=blk,
                                     options=stats.StatsOptions.from_config(gram_dtype="float64", max_tokens=60,
                                                                            max_batch=4))
    all_segments, all_blocks = corpus.document_segments(lengths, 0, targets, block_targets)
    segments, records = stats.read_segments(paths, 2, model="tiny", d_m=64, corpus_fingerprint="fp", n_shards=2)
    assert [s.id for s in segments] == sorted(set(all_segments.tolist()))
    assert set(records[0]["segments"]) & set(records[1]["segments"])  # one segment is cut by the shard boundary
    assert [s.block for s in segments] == [int(all_blocks[all_segments == s.id][0]) for s in segments]
    running = np.zeros_like(segments[0].packed)
    for k, segment in enumerate(segments):
        running = running + segment.packed
        members = np.flatnonzero(all_segments <= segment.id)
        ref = reference_second_moments(model, [docs[i] for i in members], [2])[2]
        assert sum(s.count for s in segments[:k + 1]) == ref[1] == sum(lengths[i] for i in members)
        C = stats.unpack_upper(running) / ref[1]
        assert np.linalg.norm(C - ref[0]) <= 1e-12 * np.linalg.norm(ref[0]), k


def test_segments_must_be_runs_of_documents():
    with pytest.raises(ValueError, match="must not decrease"):
        stats.segment_batches([3, 4, 5], [0, 1, 0], 100, 8, 0)
    with pytest.raises(ValueError, match="2 segment ids for 3 documents"):
        stats.segment_batches([3, 4, 5], [0, 1], 100, 8, 0)
    batches, owners = stats.segment_batches([3, 9, 4, 5, 2], [0, 0, 1, 1, 1], 100, 8, 0)
    assert owners == sorted(owners) and {i for b in batches for i in b} == set(range(5))
    assert all(len({[0, 0, 1, 1, 1][i] for i in b}) == 1 for b in batches)  # no batch mixes two segments


@pytest.mark.parametrize("d", [1, 7, stats.UNPACK_TILE, stats.UNPACK_TILE + 1, 2 * stats.UNPACK_TILE + 3])
def test_packed_upper_triangle_is_numpys_triu_order_and_round_trips_exactly(d):
    S = np.random.default_rng(d).standard_normal((d, d))
    S = S + S.T
    packed = stats.pack_upper(S)
    assert packed.tobytes() == S[np.triu_indices(d)].tobytes()  # the stored layout, row by row
    # every element back in place, in both triangles and across the unpacking's tiles, bit for bit
    assert stats.unpack_upper(packed).tobytes() == S.tobytes()


def test_a_packed_sum_of_the_wrong_length_is_refused():
    packed = stats.pack_upper(np.eye(7))
    with pytest.raises(ValueError, match="27 values are not the upper triangle"):
        stats.unpack_upper(packed[:-1])


def test_merge_refuses_other_model_width_corpus_and_missing_shards(tmp_path):
    model = tiny_model("llama")
    path = tmp_path / "s.h5"
    stats.collect_second_moments(model, random_docs(4), [0], path,
                                 {"model": "tiny", "d_m": 64, "corpus_fingerprint": "fp", "shard": 0},
                                 pad_id=0, progress=False)
    kw = dict(model="tiny", d_m=64, corpus_fingerprint="fp", n_shards=1)
    with pytest.raises(ProvenanceError, match="this statistics block has model = 'tiny' but 'gpt2' was expected .* rerun the activation_stats rule"):
        stats.merge_layer([path], 0, **{**kw, "model": "gpt2"})
    with pytest.raises(ProvenanceError, match="has d_m = 64 but 3072 was expected"):
        stats.merge_layer([path], 0, **{**kw, "d_m": 3072})
    with pytest.raises(ProvenanceError, match="another corpus"):
        stats.merge_layer([path], 0, **{**kw, "corpus_fingerprint": "other"})
    with pytest.raises(ProvenanceError, match="no statistics for layer 2"):
        stats.merge_layer([path], 2, **kw)
    with pytest.raises(ProvenanceError, match=r"expected shards 0..1"):
        stats.merge_layer([path], 0, **{**kw, "n_shards": 2})


def test_truncated_stats_file_is_named(tmp_path):
    model = tiny_model("llama")
    path = tmp_path / "s.h5"
    stats.collect_second_moments(model, random_docs(4), [0], path,
                                 {"model": "tiny", "d_m": 64, "corpus_fingerprint": "fp", "shard": 0},
                                 pad_id=0, progress=False)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ProvenanceError, match=r"s\.h5.*(corrupt|truncated)"):
        stats.merge_layer([path], 0, model="tiny", d_m=64, corpus_fingerprint="fp", n_shards=1)


@pytest.mark.parametrize("gram_tokens", [0, 10**6])
def test_nan_activation_names_layer_and_batch(gram_tokens, tmp_path):
    model = tiny_model("llama")
    # Poison layer 1's down-projection input from the second batch on.
    state = {"batch": 0}

    def poison(module, args):
        state["batch"] += 1
        if state["batch"] >= 2:
            x = args[0].clone()
            x[0, 0, 0] = float("nan")
            return (x,)

    models.key_module(model, 1).register_forward_pre_hook(poison, prepend=True)
    with pytest.raises(stats.NonFiniteActivationError, match="NaN or Inf in the keys of layer 1 at batch 1$"):
        run(model, random_docs(8), [0, 1, 2], tmp_path / "s.h5", max_tokens=1, gram_tokens=gram_tokens)
    assert not (tmp_path / "s.h5").exists()


@pytest.mark.parametrize("gram_tokens, where", [(0, "batch 2"), (10**6, "batches 0-7")])
def test_float32_gram_overflow_names_layer_and_batches(gram_tokens, where, tmp_path):
    """Finite keys whose squares exceed float32 (about 3e38): the Gram check names the batches of the product."""
    model = tiny_model("llama")
    state = {"batch": 0}

    def huge(module, args):
        state["batch"] += 1
        if state["batch"] == 3:
            return (args[0] * 0 + 1e25,)

    models.key_module(model, 1).register_forward_pre_hook(huge, prepend=True)
    with pytest.raises(stats.NonFiniteActivationError,
                       match=f"float32 Gram of layer 1 over {where} is not finite although its keys are"):
        run(model, random_docs(8), [0, 1, 2], tmp_path / "s.h5", max_tokens=1, gram_tokens=gram_tokens)
    assert not (tmp_path / "s.h5").exists()


def test_half_precision_gram_is_refused():
    with pytest.raises(ValueError, match="gram_dtype 'float16' is refused"):
        stats.GramAccumulator(tiny_model("llama"), [0], "float16")


def test_negative_gram_tokens_are_refused():
    with pytest.raises(ValueError, match="stats.gram_tokens must be >= 0, got -1"):
        stats.GramAccumulator(tiny_model("llama"), [0], "float32", gram_tokens=-1)


def padded_positions(lengths, batches):
    return sum(max(lengths[i] for i in batch) * len(batch) for batch in batches)


def best_contiguous_cost(widths, max_tokens, max_batch, overhead):
    """Brute force over every way to cut the longest-first order into batches."""
    import itertools

    n, best = len(widths), float("inf")
    for cuts in itertools.product([False, True], repeat=n - 1):
        bounds = [0] + [i + 1 for i, c in enumerate(cuts) if c] + [n]
        groups = [(bounds[k], bounds[k + 1]) for k in range(len(bounds) - 1)]
        if all(b - a <= max_batch and (b - a == 1 or widths[a] * (b - a) <= max_tokens) for a, b in groups):
            best = min(best, sum(widths[a] * (b - a) + overhead for a, b in groups))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_token_batches_are_a_least_padding_plan(seed):
    rng = np.random.default_rng(seed)
    lengths = [int(x) for x in rng.integers(0, 60, size=11)]  # a zero-length document is skipped
    max_tokens, max_batch, overhead = 120, 4, 10
    batches = stats.token_batches(lengths, max_tokens, max_batch, overhead)
    assert sorted(i for b in batches for i in b) == [i for i, n in enumerate(lengths) if n > 0]
    for batch in batches:
        width = max(lengths[i] for i in batch)
        assert len(batch) <= max_batch and (len(batch) == 1 or width * len(batch) <= max_tokens)
    widths = sorted((n for n in lengths if n > 0), reverse=True)
    cost = padded_positions(lengths, batches) + overhead * len(batches)
    assert cost == best_contiguous_cost(widths, max_tokens, max_batch, overhead)
    assert stats.token_batches(lengths, max_tokens, max_batch, overhead) == batches  # deterministic


def test_token_batches_avoid_the_padding_of_greedy_filling():
    # A few long documents among many short ones (like Wikipedia lead sections): filling each batch up to
    # max_tokens pads the short ones to the long ones' width.
    lengths = [305, 205, 155, 138] + [100] * 20 + [60] * 16
    batches = stats.token_batches(lengths, 4096, 64, 64)
    padding = 1 - sum(lengths) / padded_positions(lengths, batches)
    assert padding < 0.05
    # one oversized document still gets a batch of its own
    assert stats.token_batches([5000, 10, 10], 4096, 64, 64) == [[0], [1, 2]]


def test_block_names_and_plans_reuse_existing_statistics():
    from superposition.config import block_layers, block_name, plan_blocks

    for layers in ([0, 1, 2, 5, 7, 8], [3], list(range(40)), [0, 2, 4]):
        assert block_layers(block_name(layers)) == layers
    assert block_name([0, 1, 2, 5, 7, 8]) == "0-2_5_7-8"
    assert plan_blocks([0, 1, 2, 3, 4], None) == [[0, 1, 2, 3, 4]]
    assert plan_blocks([4, 0, 1, 2, 3], 2) == [[0, 1], [2, 3], [4]]
    # a finished run on layers 0-1 that now asks for 0-4: the old block stays, the new layers get their own
    assert plan_blocks([0, 1, 2, 3, 4], None, [[0, 1]]) == [[0, 1], [2, 3, 4]]
    assert plan_blocks([0, 1, 2, 3, 4], 2, [[0, 1]]) == [[0, 1], [2, 3], [4]]
    # fewer layers than before: the existing block still serves them; unrelated blocks are ignored
    assert plan_blocks([1], None, [[0, 1, 2], [7]]) == [[0, 1, 2]]


def run_statistics(out, checkpoint, crash_after=None):
    """The statistics job of the resume tests: Gram products of >= 50 tokens (about 2 batches) that straddle the
    checkpoints every 3 batches. With ``crash_after`` the process dies like a killed job, without any cleanup,
    once that many batches are done (only ever in a child process)."""
    if crash_after is not None:
        add_batch = stats.GramAccumulator.add_batch

        def dying(self, ids, mask, positions, batch_index):
            n = add_batch(self, ids, mask, positions, batch_index)
            if batch_index + 1 == crash_after:
                os._exit(17)
            return n

        stats.GramAccumulator.add_batch = dying
    # three segments in two jackknife blocks: the kill and the signal land after a segment was closed
    segments, blocks = [0] * 8 + [1] * 6 + [2] * 26, [0] * 14 + [1] * 26
    stats.collect_second_moments(tiny_model("gemma3_text"), random_docs(40, max_len=20), [0, 1, 2], str(out),
                                 {"model": "tiny"}, pad_id=0, segments=segments, segment_blocks=blocks,
                                 options=stats.StatsOptions.from_config(max_tokens=40, checkpoint_every=3,
                                                                        gram_tokens=50),
                                 checkpoint_path=str(checkpoint) if checkpoint else None, progress=False)


def killed_run(tmp_path, out, checkpoint, crash_after=7):
    """run_statistics in a child process that dies after ``crash_after`` batches (the only subprocess here)."""
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_stats import run_statistics
        run_statistics({str(out)!r}, {str(checkpoint)!r}, crash_after={crash_after})
    """))
    crashed = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert crashed.returncode == 17, crashed.stderr
    assert checkpoint.exists() and not out.exists()


def signalled_run(tmp_path, out, checkpoint, signal_after=1, again_after=None):
    """run_statistics in a child process that sends itself SIGUSR1 (as sbatch --signal=USR1@... does) after
    ``signal_after`` batches; it must stop at its next checkpoint (every 3 batches) with a JobStopped error. With
    ``again_after`` (seconds) the signal comes a second time that long after the first."""
    script = tmp_path / "signalled.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal, sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from superposition import stats
        from test_stats import run_statistics
        add_batch = stats.GramAccumulator.add_batch
        def signalling(self, ids, mask, positions, batch_index):
            n = add_batch(self, ids, mask, positions, batch_index)
            if batch_index + 1 == {signal_after}:
                os.kill(os.getpid(), signal.SIGUSR1)
                if {again_after!r} is not None:
                    time.sleep({again_after!r})
                    os.kill(os.getpid(), signal.SIGUSR1)
            return n
        stats.GramAccumulator.add_batch = signalling
        run_statistics({str(out)!r}, {str(checkpoint)!r})
    """))
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def undisturbed_sums(tmp_path_factory):
    """The same job run once without a checkpoint file and once with one that is never needed."""
    tmp = tmp_path_factory.mktemp("undisturbed")
    run_statistics(tmp / "plain.h5", None)
    run_statistics(tmp / "checked.h5", tmp / "unused-checkpoint.h5")
    return read_segment_sums(tmp / "plain.h5"), read_segment_sums(tmp / "checked.h5")


def test_killed_job_resumes_to_an_identical_result(tmp_path, undisturbed_sums, capsys):
    ckpt, out = tmp_path / "ckpt.h5", tmp_path / "out.h5"
    killed_run(tmp_path, out, ckpt)
    with h5py.File(ckpt) as f:
        assert int(f.attrs["next_batch"]) == 6
    capsys.readouterr()
    run_statistics(out, ckpt)
    printed = capsys.readouterr().out
    assert "resuming from" in printed and "at batch 6/" in printed
    assert not ckpt.exists()
    (a, na), ((b, nb), (c, nc)) = read_segment_sums(out), undisturbed_sums
    assert na == nb == nc == [0, 1, 2]
    for key in a:
        assert np.array_equal(a[key], b[key])
        assert np.array_equal(a[key], c[key])  # no checkpoint file: the same products, the same bits


@pytest.mark.parametrize("damage", ["drop_last_layer", "truncate", "spilled_segment", "missing_segment"])
def test_a_damaged_checkpoint_is_restored_whole_or_not_at_all(damage, tmp_path, undisturbed_sums, capsys):
    """A checkpoint whose later layer, or one of whose finished segments (each in its own file beside it), cannot
    be read must not leave the earlier layers' or segments' sums restored."""
    ckpt, out = tmp_path / "ckpt.h5", tmp_path / "out.h5"
    killed_run(tmp_path, out, ckpt)
    spilled = sorted(tmp_path.glob("ckpt.h5.segment-*.h5"))
    with h5py.File(ckpt) as f:
        assert [p.name for p in spilled] == [f"ckpt.h5.segment-{s}.h5" for s in json.loads(f.attrs["segments"])]
    assert spilled  # the kill came after the first segment was finished
    if damage == "drop_last_layer":
        with h5py.File(ckpt, "a") as f:
            del f["layer_2"]
    elif damage == "spilled_segment":
        data = bytearray(spilled[-1].read_bytes())
        data[len(data) // 2:len(data) // 2 + 64] = bytes(64)  # zeros inside the last layer's sums
        spilled[-1].write_bytes(bytes(data))
    elif damage == "missing_segment":
        spilled[0].unlink()
    else:
        data = ckpt.read_bytes()
        ckpt.write_bytes(data[: len(data) * 2 // 3])
    capsys.readouterr()
    run_statistics(out, ckpt)
    printed = capsys.readouterr().out
    assert "not resumed" in printed and "resuming from" not in printed
    (a, na), (b, nb) = read_segment_sums(out), undisturbed_sums[0]
    assert na == nb
    for key in b:
        assert np.array_equal(a[key], b[key]), key
    assert not list(tmp_path.glob("ckpt.h5*"))  # checkpoint and spilled segments are gone with the output


def test_a_signalled_job_stops_at_its_next_checkpoint_and_resumes_to_the_same_bits(tmp_path, undisturbed_sums,
                                                                                    capsys):
    ckpt, out = tmp_path / "ckpt.h5", tmp_path / "out.h5"
    stopped = signalled_run(tmp_path, out, ckpt, signal_after=1)
    assert stopped.returncode != 0 and not out.exists()
    assert "JobStopped: stopped on SIGUSR1 at batch 3/" in stopped.stderr, stopped.stderr[-2000:]
    with h5py.File(ckpt) as f:
        assert int(f.attrs["next_batch"]) == 3  # the first regular checkpoint after the signal
    capsys.readouterr()
    run_statistics(out, ckpt)
    printed = capsys.readouterr().out
    assert "resuming from" in printed and "at batch 3/" in printed
    (a, na), (b, nb) = read_segment_sums(out), undisturbed_sums[0]
    assert na == nb and all(np.array_equal(a[key], b[key]) for key in b)


def test_a_signal_repeated_at_once_is_one_request_and_a_later_one_ends_the_job(tmp_path):
    """SLURM signals an srun step's processes twice within milliseconds at a time limit (tests/test_slurm.py): that
    is still a stop at the next checkpoint. A second signal REPEATED_SIGNAL_SECONDS after the first ends the job
    at once (the default action), before the checkpoint after batch 3."""
    ckpt, out = tmp_path / "ckpt.h5", tmp_path / "out.h5"
    stopped = signalled_run(tmp_path, out, ckpt, signal_after=1, again_after=0.0)
    assert "SIGUSR1 received again" in stopped.stderr + stopped.stdout, stopped.stderr[-2000:]
    assert "JobStopped: stopped on SIGUSR1 at batch 3/" in stopped.stderr, stopped.stderr[-2000:]
    with h5py.File(ckpt) as f:
        assert int(f.attrs["next_batch"]) == 3
    ckpt.unlink()
    killed = signalled_run(tmp_path, out, ckpt, signal_after=1, again_after=stats.REPEATED_SIGNAL_SECONDS + 0.2)
    assert killed.returncode == -signal.SIGUSR1, killed.stderr[-2000:]
    assert "JobStopped" not in killed.stderr and not ckpt.exists() and not out.exists()


def test_without_a_checkpoint_file_a_signal_ends_the_job_at_once(tmp_path):
    stopped = signalled_run(tmp_path, tmp_path / "out.h5", "", signal_after=1)
    assert stopped.returncode == -signal.SIGUSR1  # the default action: nothing to resume from, so no waiting


def test_options_come_from_the_stats_section_with_the_schemas_defaults_for_the_rest():
    from superposition import settings

    options = stats.StatsOptions.from_config({"max_tokens_per_batch": 123, "checkpoint_every": 7}, gram_tokens=9)
    assert (options.max_tokens, options.checkpoint_every, options.gram_tokens) == (123, 7, 9)
    # every key the section lacks is the schema's default
    assert options.max_batch == settings.default("stats.max_batch_size")
    assert options.gram_dtype == settings.default("stats.gram_dtype")
    assert options.allow_tf32 is settings.default("stats.allow_tf32")
    for field_name, key in stats.StatsOptions.CONFIG_KEYS.items():
        assert settings.default(f"stats.{key}") == getattr(stats.StatsOptions.from_config(), field_name)
