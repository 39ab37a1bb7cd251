"""The Snakemake workflow end to end on a tiny local model, dry runs of the default DAG, and config errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from workflow_helpers import REPO, job_counts, snakemake, tiny_settings, write_config


def test_default_config_dry_run_lists_the_whole_dag(tmp_path):
    # a results directory of its own: the statistics blocks are planned from what exists on disk
    out = snakemake("-n", "--forceall", "--config", f"results={tmp_path}/results").stdout
    counts = job_counts(out)
    # two models, 30 + 18 layers, 2 corpus shards, one stats job per shard and model
    assert counts["model_snapshot"] == 2
    assert counts["corpus_shards"] == 2
    assert counts["activation_stats"] == 4
    assert counts["covariance"] == counts["whitening"] == counts["matrices"] == 48
    assert counts["fact_predictions"] == 2 and counts["known_facts"] == 1 and counts["keys"] == 2


def test_wrong_type_is_a_schema_error_naming_the_key(tmp_path):
    cfg = write_config(tmp_path, corpus={"source": "wiki_offline", "n_documents": "many"})
    proc = snakemake("-n", "--configfile", str(cfg), check=False)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "n_documents" in text and "'many' is not of type" in text


def test_layer_out_of_range_is_a_config_error(tmp_path):
    cfg = write_config(tmp_path, layers=[0, 25])
    proc = snakemake("-n", "--configfile", str(cfg), check=False)
    assert proc.returncode != 0
    assert "layer(s) [25] out of range for model 'gemma3-270m', which has 18 layers" in proc.stdout + proc.stderr


def test_edit_layer_out_of_range_is_a_config_error(tmp_path):
    cfg = write_config(tmp_path, editing={"layer": 40})
    out = snakemake("-n", "--configfile", str(cfg), check=False)
    assert out.returncode != 0
    assert re.search(r"editing.layer 40 is out of range for model '[\w.-]+': its analysed layers are 0..", out.stdout)


def test_unknown_model_package_is_a_config_error(tmp_path):
    cfg = write_config(tmp_path, models={"x": {"source": "gguf_package", "package": "nope", "n_layers": 2}})
    proc = snakemake("-n", "--configfile", str(cfg), check=False)
    assert proc.returncode != 0
    assert "models.x.package is 'nope'" in proc.stdout + proc.stderr


def test_tiny_workflow_outputs_and_provenance(tiny_run):
    tmp, _ = tiny_run
    res = tmp / "results"
    for layer in range(3):
        with h5py.File(res / f"matrices/tiny/layer-{layer}.h5") as f:
            P = f["P"][()]
            assert list(f["case_ids"][()]) == [4, 0, 1, 2]
            assert f.attrs["model"] == "tiny" and f.attrs["layer"] == layer
            assert f.attrs["n_tokens"] > 48
        np.testing.assert_array_equal(np.diag(P), 1.0)
        with h5py.File(res / f"covariance/tiny/layer-{layer}.h5") as f:
            C = f["C"][()]
            assert f.attrs["centred"] == False  # noqa: E712 - h5py gives numpy bools
            shards = json.loads(f.attrs["shards"])
        assert [s["shard"] for s in shards] == [0, 1]
        np.testing.assert_allclose(C, C.T, atol=0)
    # execution settings are provenance, not params
    for shard in (0, 1):
        with h5py.File(res / f"stats/tiny/shard-{shard}.block-0-2.h5") as f:
            execution = json.loads(f.attrs["execution"])
        assert execution["stats.checkpoint_every"] == 1 and execution["stats.max_tokens_per_batch"] == 256
        assert execution["stats.device"] == "auto"
    with h5py.File(res / "keys/tiny.h5") as f:
        assert json.loads(f.attrs["execution"])["facts.batch_size"] == 64
        assert f.attrs["prompt_mode"] == "as_is"  # part of the keys' provenance (and rerun key: test_incremental)
        # "France is located in" starts with its subject (one token of SmolLM2's tokenizer): flagged
        assert list(f["first_position"][()]) == [False, False, True, False, False]  # case_ids 4, 0, 1, 2, 3
    subjects = (res / "keys/tiny.subjects.tsv").read_text().splitlines()
    assert subjects[0].split("\t")[-1] == "first_position" and subjects[3].endswith("\t1")
    assert "WARNING: 1 selected facts have their subject's last token at the sequence's first position" in \
        (res / "logs/keys/tiny.log").read_text()
    manifest = json.loads((res / "corpus/tiny/manifest.json").read_text())
    assert manifest["corpus_documents"] == 24 and manifest["n_shards"] == 2
    selection = json.loads((res / "facts/selection.json").read_text())
    assert selection["selected"] == [4, 0, 1, 2] and "bypassed" in selection["mode"]
    top = (res / "matrices/tiny/top_pairs.tsv").read_text().splitlines()
    # m = 4 facts: all 12 off-diagonal pairs of each of the 3 layers (top_pairs is 20)
    assert top[0].startswith("layer\trank\tp\t") and len(top) == 1 + 3 * 12
    assert [line.split("\t")[0] for line in top[1:]] == ["0"] * 12 + ["1"] * 12 + ["2"] * 12


def test_lifelong_editing_outputs(tiny_run):
    from superposition import editing, settings
    from superposition.provenance import read_table

    tmp, _ = tiny_run
    res = tmp / "results/editing/tiny"
    steps = read_table(res / "layer-1.steps.tsv")
    assert [int(r["n_edits"]) for r in steps] == [0, 1, 2]
    # every configured method's columns (the default: all three), nothing else
    default_methods = settings.rule_settings({}, "lifelong_edit")["editing"]["methods"]
    assert list(steps[0]) == ["step", "n_edits"] + [f"{m}_{k}" for m in default_methods for k in editing.step_fields(m)]
    # measured in the edited model's forward: the layer's output change at the retained facts' subject tokens is
    # what P predicts, up to float32 rounding; the algebraic consistency check is float64 round-off
    assert all(float(r["closed_form_prediction_rel_error"]) < 1e-3 for r in steps)
    assert all(float(r["closed_form_consistency_rel_error"]) < 1e-8 for r in steps)
    assert float(steps[0]["closed_form_measured_interference_max"]) == 0.0
    assert float(steps[0]["closed_form_consistency_interference_max"]) == 0.0
    for r in steps[1:]:
        assert all(float(r[f"{m}_measured_interference_mean"]) > 0 for m in ("closed_form", "null_space"))
        assert float(r["closed_form_last_hidden_change_mean"]) > 0  # the change reaches the last layer
        # the control leaves the retained facts' keys unchanged: float32 noise against the closed form's change
        assert float(r["control_measured_interference_max"]) < 1e-3 * float(r["closed_form_measured_interference_mean"])
        assert float(r["control_consistency_interference_max"]) < 1e-10 * float(
            r["closed_form_consistency_interference_mean"])
        assert float(r["control_key_gain_min"]) == pytest.approx(1.0, abs=1e-9)
    facts = read_table(res / "layer-1.facts.tsv")
    # retention is measured on the other selected facts (m = 4)
    assert [r["role"] for r in facts] == ["edited", "edited", "retained", "retained"]
    assert [int(r["case_id"]) for r in facts] == [4, 0, 1, 2]  # the selection's order
    assert all(r["target_new"] and r["target_new"] != r["target_true"] for r in facts[:2])
    assert all(r[f"{m}_success"] in ("0", "1") for r in facts[:2] for m in default_methods)
    assert all(float(r["control_measured_interference"]) < 1e-3 * float(r["closed_form_measured_interference"])
               for r in facts[2:])
    with h5py.File(res / "layer-1.h5") as f:
        assert f.attrs["model"] == "tiny" and f.attrs["layer"] == 1 and f.attrs["null_space_dim"] == 48
        assert f.attrs["null_space_cutoff"] == 1.0e6
        assert f["closed_form/deltas"].shape == (2, 32) and f["closed_form/consistency_dv"].dtype == np.float64
        rows = f["retained_rows"][()]
        assert f["closed_form/measured_dv"].shape == (32, 2) and list(rows) == [2, 3]
        predicted = f["closed_form/predicted_dv"][()]
        rel = np.linalg.norm(predicted - f["closed_form/consistency_dv"][()]) / np.linalg.norm(predicted)
        assert rel < 1e-8
        measured = f["closed_form/measured_dv"][()]  # hooked, float32 forward
        assert np.linalg.norm(predicted[:, rows] - measured) / np.linalg.norm(measured) < 1e-3
        np.testing.assert_allclose(f["control/key_gain"][()], 1.0, atol=1e-9)
        # the saved weight change of the edited layer reproduces the algebraic output change on every key
        keys = h5py.File(tmp / "results/keys/tiny.h5")["keys"][:, 1, :].astype(np.float64)
        for method in ("closed_form", "null_space", "control"):  # the default editing.methods
            np.testing.assert_allclose(f[method]["weight_change"][()] @ keys.T, f[method]["consistency_dv"][()],
                                       rtol=1e-10, atol=1e-12)
    # the figure's statistics are a table too, computed from the per-fact table
    (row,) = read_table(res / "layer-1.separation.tsv")
    retained = facts[2:]
    assert (row["model"], row["layer"], row["n_edits"], row["method"]) == ("tiny", "1", "2", "closed_form")
    assert int(row["n_retained"]) == 2
    assert int(row["n_forgotten"]) == sum(r["closed_form_forgotten"] == "1" for r in retained)
    assert float(row["max_interference"]) == pytest.approx(
        max(float(r["closed_form_relative_interference"]) for r in retained), rel=1e-6)


def test_lifelong_editing_runs_the_configured_methods_only(tiny_run, tmp_path):
    """The job with editing.methods [control, null_space] and a relative null-space threshold, on the tiny run's
    inputs: only those methods' columns and groups, the null space of the stated dimension, and a figure job that
    copes without the closed form."""
    from superposition import settings, stats as stats_mod
    from superposition.jobs import facts_source
    from superposition.jobs.editing import lifelong_edit
    from superposition.jobs.figures import figure_editing
    from superposition.provenance import read_table

    tmp, cfg_path = tiny_run
    config = yaml.safe_load(Path(cfg_path).read_text())
    config["editing"].update({"methods": ["control", "null_space"], "null_space_relative": 0.5,
                              "control_protects_edits": True})
    cfg = settings.rule_settings(config, "lifelong_edit")
    r = tmp / "results"
    out = {k: str(tmp_path / f"layer-1.{k}") for k in ("steps.tsv", "facts.tsv", "h5")}
    lifelong_edit(str(r / "models/tiny/model.json"), str(r / "keys/tiny.h5"), str(r / "whitening/tiny/layer-1.h5"),
                  str(r / "covariance/tiny/layer-1.h5"), str(r / "facts/selection.json"), facts_source(cfg),
                  cfg["stats"], cfg["editing"], 1, out["steps.tsv"], out["facts.tsv"], out["h5"])
    steps = read_table(out["steps.tsv"])
    assert not any("closed_form" in c for c in steps[0]) and "control_key_gain_min" in steps[0]
    assert [c.split("_")[0] for c in steps[0] if c not in ("step", "n_edits")] == ["control"] * 11 + ["null"] * 10
    facts = read_table(out["facts.tsv"])
    assert not any("closed_form" in c for c in facts[0]) and "null_space_measured_interference" in facts[0]
    C, _ = stats_mod.read_covariance(r / "covariance/tiny/layer-1.h5", model="tiny", layer=1, d_m=48)
    eigenvalues = np.linalg.eigvalsh(C)  # the tiny run's ridge is 0
    with h5py.File(out["h5"]) as f:
        assert sorted(f) == ["control", "edit_rows", "null_space", "pool_case_ids", "retained_rows"]
        assert f.attrs["null_space_dim"] == int((eigenvalues < 0.5 * eigenvalues.max()).sum())
        assert 0 < f.attrs["null_space_dim"] < 48
        assert f.attrs["null_space_cutoff"] == pytest.approx(0.5 * eigenvalues.max(), rel=1e-9)
        # the protected first edit's key keeps its delta through the second control edit (float64 algebra)
        row = int(f["edit_rows"][0])
        np.testing.assert_allclose(f["control/consistency_dv"][:, row], f["control/deltas"][0], rtol=1e-8)
    figures = {k: str(tmp_path / f"fig.{k}") for k in ("curves.png", "curves.pdf", "scatter.png", "scatter.pdf")}
    figure_editing(str(r / "models/tiny/model.json"), out["steps.tsv"], out["facts.tsv"], 1, {}, figures["curves.png"],
                   figures["curves.pdf"], figures["scatter.png"], figures["scatter.pdf"],
                   str(tmp_path / "separation.tsv"), 100)
    assert all(Path(p).stat().st_size > 0 for p in figures.values())
    (row,) = read_table(tmp_path / "separation.tsv")
    assert row["method"] == "none" and int(row["n_retained"]) == 2 and row["auc_forgotten_vs_kept"] in ("", "nan")


def test_lifelong_editing_with_memit_reads_its_layers_statistics(tiny_run, tmp_path):
    """The job with MEMIT over layers 0-1 of the tiny run (its layers' whitening files as inputs): MEMIT's columns,
    every layer's saved weight change, its key drift recorded apart from the pipeline-key check; a whitening file
    missing from the list is an error."""
    from superposition import config as sp_config, settings
    from superposition.jobs import facts_source
    from superposition.jobs.editing import lifelong_edit
    from superposition.provenance import ProvenanceError, read_table

    tmp, cfg_path = tiny_run
    config = yaml.safe_load(Path(cfg_path).read_text())
    config["editing"].update({"methods": ["closed_form", "memit"], "memit_layers": 2, "memit_batch_size": 1,
                              "memit_mom2_weight": 1.0})
    assert sp_config.memit_layers(config, "tiny") == [0, 1]
    cfg = settings.rule_settings(config, "lifelong_edit")
    r = tmp / "results"
    out = {k: str(tmp_path / f"layer-1.{k}") for k in ("steps.tsv", "facts.tsv", "h5")}
    args = (str(r / "models/tiny/model.json"), str(r / "keys/tiny.h5"), str(r / "whitening/tiny/layer-1.h5"),
            str(r / "covariance/tiny/layer-1.h5"), str(r / "facts/selection.json"), facts_source(cfg), cfg["stats"],
            cfg["editing"], 1, out["steps.tsv"], out["facts.tsv"], out["h5"])
    with pytest.raises(ProvenanceError, match=r"MEMIT edits layers \[0, 1\] but 1 whitening files were given"):
        lifelong_edit(*args, [str(r / "whitening/tiny/layer-1.h5")])
    lifelong_edit(*args, [str(r / f"whitening/tiny/layer-{x}.h5") for x in (0, 1)])
    steps = read_table(out["steps.tsv"])
    assert {"memit_prediction_rel_error", "memit_prediction_rel_error_layers", "memit_key_change_mean"} <= set(steps[0])
    assert float(steps[-1]["memit_key_change_mean"]) > 0  # layer 0's edits moved layer 1's keys
    with h5py.File(out["h5"]) as f:
        assert sorted(f["memit/layer_changes"]) == ["0", "1"]
        np.testing.assert_array_equal(f["memit/layer_changes/1"][()], f["memit/weight_change"][()])
        assert json.loads(f.attrs["memit_layers"]) == [0, 1] and f.attrs["memit_key_drift_max"] > 0


def test_rome_export_matches_the_covariance_and_its_manifest_verifies(tiny_run):
    from superposition.jobs.covariance import verify_rome_export
    from superposition.provenance import ProvenanceError

    tmp, cfg = tiny_run
    snakemake("rome_stats", "--configfile", str(cfg), "--cores", "1")
    res = tmp / "results"
    files = sorted((res / "rome_stats/tiny/wikipedia_stats").glob("*.npz"))
    # the sample size is the documents actually used (the corpus manifest's count)
    used = json.loads((res / "corpus/tiny/manifest.json").read_text())["corpus_documents"]
    assert [f.name for f in files] == [f"model.layers.{l}.mlp.down_proj_float32_mom2_{used}.npz" for l in range(3)]
    for layer, path in enumerate(files):
        state = np.load(path, allow_pickle=False)
        with h5py.File(res / f"covariance/tiny/layer-{layer}.h5") as f:
            C, n = f["C"][()], int(f.attrs["n_tokens"])
        assert int(state["mom2.count"]) == n and int(state["sample_size"]) == used
        assert state["mom2.mom2"].dtype == np.float32
        np.testing.assert_allclose(state["mom2.mom2"] / n, C, rtol=1e-6, atol=1e-9)
    manifest = res / "rome_stats/tiny/manifest.json"
    record = json.loads(manifest.read_text())
    assert record["model"] == "tiny" and record["corpus_documents"] == used and len(record["files"]) == 3
    assert record["corpus_fingerprint"] and record["code_version"].startswith("superposition")
    verify_rome_export(manifest)
    files[1].write_bytes(files[1].read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ProvenanceError, match="layers.1.mlp.down_proj.* does not match the sha256"):
        verify_rome_export(manifest)

def test_lint_and_format():
    lint = snakemake("--lint", check=False)
    assert lint.returncode == 0 and "Lints for" not in lint.stdout + lint.stderr, lint.stdout[-3000:]
    fmt = subprocess.run([str(Path(sys.executable).parent / "snakefmt"), "--check", "."], cwd=REPO,
                         capture_output=True, text=True)
    assert fmt.returncode == 0, fmt.stderr[-3000:]


def test_paper_rebuild_dry_run_needs_no_network(tmp_path):
    out = snakemake("-n", "--configfile", "config/paper.yaml", "--forceall",
                    "--config", f"results={tmp_path}/results/paper").stdout
    counts = job_counts(out)
    assert counts["model_snapshot"] == 11 and counts["keys"] == 11
    assert counts["matrices"] == 12 + 24 + 36 + 16 + 32 + 32 + 28 + 32 + 40 + 32 + 32
    # layer blocks: Llama-2-13B's 40 layers in blocks of 10 over 8 shards
    assert f"{tmp_path}/results/paper/stats/llama-2-13b/shard-7.block-30-39.h5" in out
    assert "fact_predictions" not in counts  # explicit case_ids bypass the known-fact filter


def test_every_figure_rule_wrote_a_decodable_png_and_a_pdf(tiny_run):
    from PIL import Image

    tmp, _ = tiny_run
    figures = tmp / "results/figures"
    pngs = sorted(figures.rglob("*.png"))
    names = {p.relative_to(figures).as_posix() for p in pngs}
    assert names == {"tiny/p_heatmaps.png", "tiny/p_kde.png", "tiny/kurtosis_vs_m.png",
                     "tiny/editing_curves.layer-1.png", "tiny/editing_interference.layer-1.png", "tiny/convergence.png",
                     "fig3_p_heatmaps_first_layer.png", "fig4_p_kde_first_layer.png", "fig5_kurtosis_vs_layer.png",
                     "fig6_angles_last_layer.png", "kurtosis_vs_size.png"}
    for png in pngs:
        with Image.open(png) as image:
            image.load()
            assert image.format == "PNG" and image.size[0] >= 400 and image.size[1] >= 300, (png, image.size)
        assert png.with_suffix(".pdf").read_bytes()[:4] == b"%PDF"
    rows = (tmp / "results/summaries/tiny/layers.tsv").read_text().splitlines()
    assert len(rows) == 1 + 3 and rows[0].startswith("layer\tm\tn_values\tn_tokens\tP_excess_kurtosis")


def dry_run_counts(tmp, cfg_path, **changes):
    cfg = yaml.safe_load(cfg_path.read_text())
    for key, value in changes.items():
        cfg[key] = value
    path = tmp / "changed.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return job_counts(snakemake("-n", "--configfile", str(path)).stdout)


def test_adding_a_model_schedules_only_its_jobs(tiny_run):
    tmp, cfg = tiny_run
    models = yaml.safe_load(cfg.read_text())["models"]
    models["tiny-copy"] = dict(models["tiny"])
    counts = dry_run_counts(tmp, cfg, models=models)
    per_model = {"model_snapshot": 1, "corpus_shards": 1, "activation_stats": 2, "covariance": 3, "whitening": 3,
                 "keys": 1, "matrices": 3, "top_pairs": 1, "summaries": 1, "kde": 1, "kurtosis_vs_m": 1, "figure_heatmaps": 1, "figure_kde": 1,
                 "figure_kurtosis_vs_m": 1, "lifelong_edit": 1, "figure_editing": 1, "resampling": 3, "convergence": 1,
                 "figure_convergence": 1}
    across_models = {"figure_p_across_models": 1, "figure_kde_across_models": 1, "figure_kurtosis_vs_layer": 1,
                     "figure_angles": 1, "figure_kurtosis_vs_size": 1, "all": 1}
    assert counts == {**per_model, **across_models}


def test_adding_layers_runs_statistics_only_for_them_and_leaves_the_other_layers_alone(tiny_run, tmp_path):
    tiny_dir, _ = tiny_run
    res = tmp_path / "results"
    before = write_config(tmp_path, layers=[0, 1], **tiny_settings(tiny_dir))
    # targets first: --configfile takes every argument after it
    snakemake(*[f"{res}/matrices/tiny/layer-{l}.h5" for l in (0, 1)], "--cores", "2", "--configfile", str(before))
    old = {p: p.stat().st_mtime_ns for p in res.glob("*/tiny/layer-*.h5")} | \
        {p: p.stat().st_mtime_ns for p in res.glob("*/tiny.h5")}
    assert sorted(p.name for p in res.glob("stats/tiny/*.h5")) == ["shard-0.block-0-1.h5", "shard-1.block-0-1.h5"]

    cfg_after = tmp_path / "after.yaml"
    cfg_after.write_text(yaml.safe_dump({**yaml.safe_load(before.read_text()), "layers": "all"}))
    targets = [f"{res}/matrices/tiny/layer-{l}.h5" for l in (0, 1, 2)]
    counts = job_counts(snakemake(*targets, "-n", "--configfile", str(cfg_after)).stdout)
    # one statistics job per shard for the new layer only, then only that layer's chain; keys are kept for
    # every layer of the model, so they do not rerun either
    assert counts == {"activation_stats": 2, "covariance": 1, "whitening": 1, "matrices": 1}
    snakemake(*targets, "--cores", "2", "--configfile", str(cfg_after))
    assert sorted(p.name for p in res.glob("stats/tiny/*.h5")) == [
        "shard-0.block-0-1.h5", "shard-0.block-2.h5", "shard-1.block-0-1.h5", "shard-1.block-2.h5"]
    assert {p: p.stat().st_mtime_ns for p in old} == old  # nothing of layers 0 and 1 was rewritten
    # the new layer's covariance is the one a single all-layer pass gives (the tiny run's)
    with h5py.File(res / "covariance/tiny/layer-2.h5") as a, \
            h5py.File(tiny_dir / "results/covariance/tiny/layer-2.h5") as b:
        np.testing.assert_allclose(a["C"][()], b["C"][()], rtol=1e-12, atol=0)
        assert a.attrs["n_tokens"] == b.attrs["n_tokens"]
