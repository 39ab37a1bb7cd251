"""The tokenizers the pipeline uses, re-saved in each offline model's snapshot, must give the ids of the GGUF's own
vocabulary.

Expected ids are looked up in the vocabulary stored in each GGUF file (read with the ``gguf`` package), not taken
from transformers, so a transformers version that garbles these tokenizers (at GGUF load or at save) fails here.
The snapshots are the session's, made once by ``models.snapshot`` as the model_snapshot rule makes them.
"""

from pathlib import Path

import pytest
import transformers
from gguf import GGUFReader

from superposition import models

SENTENCE = "The capital of France is Paris"


def gguf_vocab(path):
    reader = GGUFReader(path)
    field = reader.fields["tokenizer.ggml.tokens"]
    return [bytes(field.parts[i]).decode("utf-8") for i in field.data]


def test_transformers_is_the_pinned_version():
    assert transformers.__version__ == "5.23.0"


@pytest.mark.slow  # the snapshot fixture is requested by name below, so it is not seen at collection
@pytest.mark.parametrize(
    "snapshot, pieces, bos",
    [
        ("smollm2_snapshot", ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis", "ĠParis"], None),
        ("gemma3_snapshot", ["The", "▁capital", "▁of", "▁France", "▁is", "▁Paris"], "<bos>"),
    ],
)
def test_snapshot_tokenizer_ids_match_the_gguf_vocabulary(snapshot, pieces, bos, request, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    manifest = request.getfixturevalue(snapshot)
    path = models.locate_gguf(manifest["package"], tmp_path)
    assert manifest["gguf_sha256"] == models.sha256_file(path)
    vocab = gguf_vocab(path)
    expected = ([vocab.index(bos)] if bos else []) + [vocab.index(p) for p in pieces]
    tokenizer = AutoTokenizer.from_pretrained(manifest["path"])
    ids = tokenizer(SENTENCE)["input_ids"]
    assert ids == expected
    assert tokenizer.decode(ids, skip_special_tokens=True) == SENTENCE
    assert len(tokenizer) >= len(vocab)
    # the statistics jobs pad with the config's id instead of loading the tokenizer: the same batches as before
    assert models.pad_token_id(AutoConfig.from_pretrained(manifest["path"])) == tokenizer.pad_token_id


def test_gemma_snapshot_describes_the_model_it_holds(gemma3_snapshot):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(gemma3_snapshot["path"])
    assert gemma3_snapshot["model_type"] == config.model_type == "gemma3_text"
    assert (gemma3_snapshot["n_layers"], gemma3_snapshot["d_m"]) == (config.num_hidden_layers, config.intermediate_size)
    assert 250 < gemma3_snapshot["params_millions"] < 300  # counted from the safetensors headers
    assert models.read_manifest(Path(gemma3_snapshot["path"]).parent / "model.json", "gemma3-270m") == gemma3_snapshot
