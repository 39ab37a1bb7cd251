"""corpus_shards."""

from __future__ import annotations

from typing import Any, Sequence

from .. import corpus as corpus_mod
from .. import models
from ..provenance import environment, write_json


def corpus_shards(model_json: str, corpus_cfg: dict[str, Any], shard_paths: Sequence[str], manifest_path: str) -> dict:
    from transformers import AutoTokenizer

    manifest = models.read_manifest(model_json)
    tokenizer = AutoTokenizer.from_pretrained(manifest["path"], trust_remote_code=manifest.get("trust_remote_code", False))
    documents = corpus_mod.load_documents(corpus_cfg)
    record = {**models.provenance_of(manifest), **environment()}
    out = corpus_mod.build_shards(tokenizer, documents, corpus_cfg, manifest.get("context_length"), shard_paths, record)
    write_json(manifest_path, out)
    print(f"corpus {out['corpus_id']}: {out['corpus_documents']} documents, {out['corpus_tokens']} tokens, "
          f"{len(shard_paths)} shards")
    return out
