"""Downloads on the submit host: the download records of hub models and hf_datasets corpora, and the snapshot and
corpus jobs that read them without the network (rules model_download, corpus_download)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from superposition import corpus as corpus_mod
from superposition import models
from superposition.jobs.snapshot import model_download, model_snapshot
from superposition.provenance import ProvenanceError, read_json

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _fake_hub_snapshot(tmp_path: Path) -> Path:
    """A tiny Llama laid out as a hub cache snapshot (snapshots/<commit>/), no tokenizer needed for the manifest."""
    from transformers import LlamaConfig, LlamaForCausalLM

    local = tmp_path / "hub" / "models--org--tiny" / "snapshots" / COMMIT
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=40, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    LlamaForCausalLM(config).save_pretrained(local)
    return local


def test_a_hub_model_is_snapshotted_from_its_download_record_without_the_hub(tmp_path, monkeypatch):
    import huggingface_hub

    local = _fake_hub_snapshot(tmp_path)
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda **kw: calls.append(kw) or str(local))
    entry = {"source": "hub", "id": "org/tiny", "n_layers": 2, "d_m": 40}
    record = model_download("tiny", entry, str(tmp_path / "models/tiny/download.json"))
    assert calls == [{"repo_id": "org/tiny", "revision": None, "allow_patterns": models.HUB_FILES}]
    assert read_json(tmp_path / "models/tiny/download.json") == record
    assert record == {"name": "tiny", "id": "org/tiny", "revision": "main", "commit": COMMIT, "path": str(local)}

    # the snapshot job never calls the hub: it reads the record
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **kw: pytest.fail("the snapshot downloaded"))
    manifest = model_snapshot("tiny", entry, str(tmp_path / "models/tiny/model.json"), str(tmp_path / "cache"),
                              str(tmp_path / "models/tiny/download.json"))
    assert (manifest["commit"], manifest["path"], manifest["n_layers"], manifest["d_m"]) == (COMMIT, str(local), 2, 40)

    # a record of another model or revision, files the job cannot see, a d_m the model does not have
    with pytest.raises(ProvenanceError, match="rerun the model_download rule"):
        models.snapshot(models.ModelSpec.from_config("tiny", {**entry, "revision": "v2"}), tmp_path / "o", tmp_path,
                        record)
    gone = {**record, "path": str(tmp_path / "elsewhere")}
    with pytest.raises(ProvenanceError, match=r"not visible here \(.*HF_HOME"):
        models.snapshot(models.ModelSpec.from_config("tiny", entry), tmp_path / "o", tmp_path, gone)
    with pytest.raises(ProvenanceError, match="models.tiny.d_m is 41 in the config but the model has 40"):
        models.snapshot(models.ModelSpec.from_config("tiny", {**entry, "d_m": 41}), tmp_path / "o", tmp_path, record)


def test_only_hub_models_are_downloaded():
    with pytest.raises(models.UnsupportedModelError, match="only hub models are downloaded"):
        models.download(models.ModelSpec.from_config("m", {"source": "local", "path": "/x"}))


def test_an_hf_datasets_corpus_is_read_from_its_download_record(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")  # the optional dependency of source hf_datasets (.[online])
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"text": f"Document {i} about a town."}) for i in range(7)))
    real_load = datasets.load_dataset
    asked = []

    def fake_load(name, config, split):  # the hub's dataset stands in for a local JSON file, prepared in the cache
        asked.append((name, config, split))
        return real_load("json", data_files=str(rows), split=split, cache_dir=str(tmp_path / "hf-cache"))

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    cfg = {"source": "hf_datasets", "dataset": "org/wiki", "dataset_config": "2023.en"}
    record = corpus_mod.download_dataset(cfg)
    assert asked == [("org/wiki", "2023.en", "train")] and record["n_rows"] == 7 and record["files"]

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("the corpus job downloaded"))
    docs = corpus_mod.load_documents(cfg, record)
    assert len(docs.texts) == 7 and docs.texts[3] == "Document 3 about a town."
    assert docs.corpus_id == f"hf:org/wiki:2023.en:train:{record['fingerprint']}"
    with pytest.raises(corpus_mod.CorpusError, match="rerun the corpus_download rule"):
        corpus_mod.load_documents({**cfg, "dataset_config": "2022.en"}, record)
    with pytest.raises(corpus_mod.CorpusError, match=r"not visible here \(.*HF_HOME"):
        corpus_mod.load_documents(cfg, {**record, "files": [str(tmp_path / "gone.arrow")]})
