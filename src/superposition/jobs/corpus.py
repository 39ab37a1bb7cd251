"""corpus_download (hf_datasets corpora, on the submit host: the network) and corpus_shards (no network)."""

from __future__ import annotations

from typing import Any, Sequence

from .. import corpus as corpus_mod
from .. import models
from ..provenance import environment, read_json, write_json


def corpus_download(corpus_cfg: dict[str, Any], out_json: str) -> dict[str, Any]:
    record = corpus_mod.download_dataset(corpus_cfg)
    write_json(out_json, record)
    print(f"{record['dataset']} {record['dataset_config']}: {record['n_rows']} rows in {len(record['files'])} files")
    return record


def corpus_shards(model_json: str, corpus_cfg: dict[str, Any], shard_paths: Sequence[str], manifest_path: str,
                  download_json: str | None = None) -> dict:
    from transformers import AutoTokenizer

    manifest = models.read_manifest(model_json)
    tokenizer = AutoTokenizer.from_pretrained(manifest["path"], trust_remote_code=manifest.get("trust_remote_code", False))
    documents = corpus_mod.load_documents(corpus_cfg, read_json(download_json) if download_json else None)
    record = {**models.provenance_of(manifest), **environment()}
    out = corpus_mod.build_shards(tokenizer, documents, corpus_cfg, manifest.get("context_length"), shard_paths, record)
    write_json(manifest_path, out)
    print(f"corpus {out['corpus_id']}: {out['corpus_documents']} documents, {out['corpus_tokens']} tokens, "
          f"{len(shard_paths)} shards")
    return out
