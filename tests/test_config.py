"""Semantic config errors, caught when the workflow is parsed (in-process: sp_config.validate is what
rules/common.smk calls, wrapped into a WorkflowError; tests/test_workflow.py checks that wrapping once)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from superposition import config as sp_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def cfg(tmp_path):
    c = yaml.safe_load((REPO / "config/config.yaml").read_text())
    c["results"] = str(tmp_path / "results")
    return c


def changed(cfg, section, **values):
    out = copy.deepcopy(cfg)
    out[section] = {**out[section], **values}
    return out


def test_the_default_config_is_valid(cfg):
    sp_config.validate(cfg)


@pytest.mark.parametrize("section, values, message", [
    ("facts", {"pool_size": 64, "m": 128}, "facts.pool_size is 64 but facts.m is 128"),
    ("facts", {"source": "file"}, "facts.source is 'file' but facts.path is not set"),
    ("facts", {"case_ids": [1, 2], "m": 3}, "facts.case_ids lists 2 facts but facts.m is 3"),
    ("facts", {"case_ids": [1, 2], "m": 2, "prompt_mode": "exclude_first"},
     "facts.prompt_mode exclude_first filters the known-fact selection, which explicit facts.case_ids bypass"),
    ("corpus", {"n_shards": 8, "n_documents": 5}, "corpus.n_shards is 8 but corpus.n_documents is only 5"),
    ("corpus", {"source": "local"}, "corpus.source is 'local' but corpus.path is not set"),
    ("summaries", {"kde_grid": [1.5, -1.5, 601]}, "summaries.kde_grid is [1.5, -1.5, 601]: its minimum"),
    ("editing", {"models": ["nope"]}, "editing.models names 'nope'"),
    ("editing", {"layer": 40}, "editing.layer 40 is out of range"),
    ("editing", {"methods": ["memit"], "layer": 2, "memit_layers": 5},
     "editing.memit_layers is 5 but the edited layer is 2"),
    ("editing", {"methods": ["memit"], "eval_every": 5, "memit_batch_size": 2},
     "editing.eval_every (5) is not a multiple of editing.memit_batch_size (2)"),
])
def test_semantic_errors_name_the_key(cfg, section, values, message):
    with pytest.raises(sp_config.ConfigError, match=None) as err:
        sp_config.validate(changed(cfg, section, **values))
    assert message in str(err.value)


def test_a_key_left_out_is_checked_at_its_schema_default(cfg):
    """A config that omits facts.pool_size (a file given without the schema's defaults filled in) is checked
    against the schema's 512: m = 600 is refused with that value in the message (not a KeyError)."""
    from superposition import settings

    facts = {k: v for k, v in cfg["facts"].items() if k != "pool_size"}
    with pytest.raises(sp_config.ConfigError) as err:
        sp_config.validate({**cfg, "facts": {**facts, "m": 600}})
    assert f"facts.pool_size is {settings.default('facts.pool_size')} but facts.m is 600" in str(err.value)


def test_an_unknown_model_type_is_refused(cfg):
    cfg["models"]["smollm2-135m"]["model_type"] = "mixtral-ish"
    with pytest.raises(sp_config.ConfigError, match="models.smollm2-135m.model_type: model_type 'mixtral-ish' has no "
                                                    "family adapter"):
        sp_config.validate(cfg)


def test_a_mixture_of_experts_model_type_is_refused_with_the_reason(cfg):
    cfg["models"]["smollm2-135m"]["model_type"] = "mixtral"
    with pytest.raises(sp_config.ConfigError) as err:
        sp_config.validate(cfg)
    assert str(err.value) == ("models.smollm2-135m.model_type: model_type 'mixtral' is not supported: its MLP is a set "
                              "of experts (mixture of experts), so there is no single down projection whose input is "
                              "the key")


@pytest.mark.parametrize("model_type", ["opt", "phi3", "gemma3", "qwen3"])
def test_a_supported_model_type_is_accepted(cfg, model_type):
    cfg["models"]["smollm2-135m"]["model_type"] = model_type
    sp_config.validate(cfg)


def test_n_layers_is_checked_against_an_existing_snapshot(cfg, tmp_path):
    manifest = tmp_path / "results/models/gemma3-270m/model.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_text('{"n_layers": 26}')
    with pytest.raises(sp_config.ConfigError, match="models.gemma3-270m.n_layers is 18 but the snapshot .* has 26"):
        sp_config.validate(cfg)


def test_d_m_that_disagrees_with_the_snapshot_is_a_config_error(cfg):
    manifest = Path(cfg["results"]) / "models" / "gemma3-270m" / "model.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_text('{"n_layers": 18, "d_m": 2048}')
    cfg["models"]["gemma3-270m"]["d_m"] = 2048
    sp_config.validate(cfg)  # the snapshot's own d_m
    cfg["models"]["gemma3-270m"]["d_m"] = 1024
    with pytest.raises(sp_config.ConfigError, match="models.gemma3-270m.d_m is 1024 but the snapshot .* has d_m 2048"):
        sp_config.validate(cfg)


def test_memit_layers_must_be_analysed(cfg):
    c = changed(cfg, "editing", methods=["closed_form", "memit"], layer=15, memit_layers=3)
    c["layers"] = [12, 15, 17]
    with pytest.raises(sp_config.ConfigError, match=r"editing.memit_layers is 3: MEMIT edits layers 13..15 of "
                                                    r"'smollm2-135m', but layers \[13, 14\] are not among the analysed"):
        sp_config.validate(c)
    c["layers"] = [13, 14, 15, 17]
    sp_config.validate(c)
    assert sp_config.memit_layers(c, "smollm2-135m") == [13, 14, 15]
    assert sp_config.memit_layers(changed(c, "editing", methods=["closed_form"]), "smollm2-135m") == []


def test_the_lifelong_config_is_valid(tmp_path):
    """config/lifelong.yaml (not the default run) passes the schema and the semantic checks; MEMIT's layers are
    among its analysed ones."""
    from snakemake.utils import validate

    from superposition import settings

    c = yaml.safe_load((REPO / "config/lifelong.yaml").read_text())
    c["results"] = str(tmp_path / "results")
    validate(c, str(settings.SCHEMA_PATH))
    sp_config.validate(c)
    assert sp_config.memit_layers(c, "smollm2-135m") == [11, 12, 13, 14, 15]
