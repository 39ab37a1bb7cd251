"""One function per workflow rule: plain paths and params in, artifacts out.

The Snakemake scripts in ``workflow/scripts`` only unpack ``snakemake.input/params/output`` and call these, so
tests can run every stage without Snakemake.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import corpus as corpus_mod
from . import facts as facts_mod
from . import keys as keys_mod
from . import matrices as matrices_mod
from . import models
from . import stats as stats_mod
from . import whitening as whitening_mod
from .provenance import ProvenanceError, atomic_path, environment, read_json, write_json


def start_job(log: str | None, threads: int | None) -> None:
    """Send the job's output to its log and size torch's thread pool to the job's cores."""
    if log:
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        handle = open(log, "w", buffering=1)
        sys.stdout = sys.stderr = handle
    if threads:
        import torch

        torch.set_num_threads(int(threads))


# ------------------------------------------------------------------------------------------- models


def model_snapshot(name: str, entry: dict[str, Any], out_json: str, cache_dir: str) -> dict[str, Any]:
    spec = models.ModelSpec.from_config(name, entry)
    return models.snapshot(spec, Path(out_json).parent, cache_dir)


# ------------------------------------------------------------------------------------------- corpus


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


# -------------------------------------------------------------------------------------------- stats


def activation_stats(model_json: str, shard_path: str, layers: Sequence[int], stats_cfg: dict[str, Any],
                     out_path: str, checkpoint_path: str | None) -> dict[str, Any]:
    manifest = models.read_manifest(model_json)
    shard = corpus_mod.read_shard(shard_path, model=manifest["name"])
    model, tokenizer = models.load(manifest, stats_cfg.get("device", "auto"), stats_cfg.get("model_dtype", "float32"))
    record = {
        **models.provenance_of(manifest),
        **environment(),
        "corpus_id": shard.attrs["corpus_id"],
        "corpus_fingerprint": shard.attrs["corpus_fingerprint"],
        "shard_fingerprint": shard.attrs["token_fingerprint"],
        "shard": shard.attrs["shard"],
        "n_shards": shard.attrs["n_shards"],
    }
    return stats_mod.collect_second_moments(
        model, shard.docs, layers, out_path, record,
        pad_id=tokenizer.pad_token_id,
        max_tokens=stats_cfg.get("max_tokens_per_batch", 4096),
        max_batch=stats_cfg.get("max_batch_size", 64),
        gram_dtype=stats_cfg.get("gram_dtype", "float32"),
        gram_tokens=stats_cfg.get("gram_tokens"),
        allow_tf32=stats_cfg.get("allow_tf32", False),
        checkpoint_path=checkpoint_path,
        checkpoint_every=stats_cfg.get("checkpoint_every", 20),
    )


def covariance(model_json: str, corpus_manifest: str, stats_paths: Sequence[str], layer: int, out_path: str) -> None:
    manifest = models.read_manifest(model_json)
    corpus = read_json(corpus_manifest)
    total, count, shards = stats_mod.merge_layer(
        stats_paths, layer, model=manifest["name"], d_m=manifest["d_m"],
        corpus_fingerprint=corpus["corpus_fingerprint"], n_shards=corpus["n_shards"])
    if count != corpus["corpus_tokens"]:
        raise ProvenanceError(f"layer {layer}: shards counted {count} tokens, the corpus has {corpus['corpus_tokens']}")
    record = {**models.provenance_of(manifest), **environment(), "layer": layer,
              "corpus_id": corpus["corpus_id"], "corpus_fingerprint": corpus["corpus_fingerprint"], "shards": shards}
    stats_mod.write_covariance(out_path, total / count, count, record)
    print(f"layer {layer}: C from {count} tokens over {len(shards)} shards")


def whitening(model_json: str, covariance_path: str, layer: int, ridge: float, out_path: str) -> None:
    manifest = models.read_manifest(model_json)
    C, attrs = stats_mod.read_covariance(covariance_path, model=manifest["name"], layer=layer, d_m=manifest["d_m"])
    w = whitening_mod.whiten(C, ridge=ridge, layer=layer, n_tokens=attrs.get("n_tokens"))
    record = {**models.provenance_of(manifest), **environment(), "layer": layer,
              "corpus_fingerprint": attrs["corpus_fingerprint"], "n_tokens": attrs["n_tokens"]}
    whitening_mod.write_whitening(out_path, w, record)
    print(f"layer {layer}: eigenvalues {w.eigenvalues[0]:.3e}..{w.eigenvalues[-1]:.3e}, "
          f"condition number {w.condition_number:.3e}")


# -------------------------------------------------------------------------------------------- facts

PREDICTION_COLUMNS = ["case_id", "relation_id", "subject", "prompt", "target_true", "target_token", "predicted_token",
                      "known", "margin", "target_prob", "subject_last_token"]


def fact_predictions(model_json: str, facts_cfg: dict[str, Any], stats_cfg: dict[str, Any], out_tsv: str) -> None:
    manifest = models.read_manifest(model_json)
    facts, _ = facts_mod.load_facts(facts_cfg)
    facts_mod.check_subjects(facts)
    model, tokenizer = models.load(manifest, stats_cfg.get("device", "auto"), stats_cfg.get("model_dtype", "float32"))
    run = keys_mod.run_prompts(model, tokenizer, facts, layers=[], predictions=True,
                               batch_size=facts_cfg.get("batch_size", 64))
    with atomic_path(out_tsv) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
            writer.writerow(PREDICTION_COLUMNS)
            for i, fact in enumerate(facts):
                writer.writerow([fact.case_id, fact.relation_id or "", fact.subject, fact.prompt, fact.target_true,
                                 tokenizer.convert_ids_to_tokens(run.target[i]),
                                 tokenizer.convert_ids_to_tokens(run.predicted[i]),
                                 int(run.predicted[i] == run.target[i]), f"{run.margin[i]:.6g}",
                                 f"{run.target_prob[i]:.6g}", run.token_str[i]])
    print(f"{manifest['name']}: knows {sum(p == t for p, t in zip(run.predicted, run.target))} of {len(facts)} facts")


def read_predictions(path: str) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    if rows and set(PREDICTION_COLUMNS) - set(rows[0]):
        raise ProvenanceError(f"{path} lacks columns {sorted(set(PREDICTION_COLUMNS) - set(rows[0]))}")
    return rows


def known_facts(model_names: Sequence[str], prediction_paths: Sequence[str], facts_cfg: dict[str, Any],
                out_tsv: str, out_selection: str) -> dict[str, Any]:
    facts, facts_id = facts_mod.load_facts(facts_cfg)
    case_ids = [f.case_id for f in facts]
    m = int(facts_cfg["m"])
    if facts_cfg.get("case_ids"):
        pool, counts, mode = case_ids, {}, "explicit case_ids (known-fact filter bypassed)"
        per_model: dict[str, dict[int, dict[str, str]]] = {}
    else:
        per_model = {}
        for name, path in zip(model_names, prediction_paths):
            rows = read_predictions(path)
            if [int(r["case_id"]) for r in rows] != case_ids:
                raise ProvenanceError(f"{path} predicts other facts than the current facts file; rerun fact_predictions")
            per_model[name] = {int(r["case_id"]): r for r in rows}
        known = {name: {c: r["known"] == "1" for c, r in rows.items()} for name, rows in per_model.items()}
        pool, counts = facts_mod.select_known(case_ids, known, m)
        mode = f"known by all of {', '.join(model_names)} (greedy first token = target)"
    pool = pool[: int(facts_cfg.get("pool_size", len(pool)))]
    by_id = {f.case_id: f for f in facts}
    with atomic_path(out_tsv) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
            writer.writerow(["rank", "case_id", "selected", "relation_id", "subject", "prompt", "target_true"]
                            + [f"margin_{n}" for n in per_model])
            for rank, c in enumerate(pool):
                f = by_id[c]
                writer.writerow([rank, c, int(rank < m), f.relation_id or "", f.subject, f.prompt, f.target_true]
                                + [per_model[n][c]["margin"] for n in per_model])
    selection = {"facts": facts_id, "mode": mode, "m": m, "pool": pool, "selected": pool[:m],
                 "known_per_model": counts, "n_facts": len(facts)}
    write_json(out_selection, selection)
    print(f"{len(pool)} facts in the pool, first {m} selected; known per model: {counts}")
    return selection


def keys(model_json: str, selection_path: str, layers: Sequence[int], facts_cfg: dict[str, Any],
         stats_cfg: dict[str, Any], out_path: str) -> None:
    manifest = models.read_manifest(model_json)
    selection = read_json(selection_path)
    facts, _ = facts_mod.load_facts({**facts_cfg, "case_ids": selection["pool"]})
    model, tokenizer = models.load(manifest, stats_cfg.get("device", "auto"), stats_cfg.get("model_dtype", "float32"))
    run = keys_mod.run_prompts(model, tokenizer, facts, layers=list(layers), predictions=False,
                               context_templates=facts_cfg.get("context_templates"),
                               batch_size=facts_cfg.get("batch_size", 64))
    record = {**models.provenance_of(manifest), **environment(), "facts": selection["facts"],
              "context_templates": facts_cfg.get("context_templates")}
    keys_mod.write_keys(out_path, run.keys, selection["pool"], run.token_index, run.token_str, layers, record)
    print(f"keys of {len(facts)} facts at {len(layers)} layers, width {run.keys.shape[-1]}")


# ----------------------------------------------------------------------------------------- matrices

TOP_PAIR_COLUMNS = ["rank", "p", "p_reverse", "w", "a", "case_id_i", "subject_i", "prompt_i", "case_id_j",
                    "subject_j", "prompt_j"]


def matrices(model_json: str, keys_path: str, whitening_path: str, selection_path: str, facts_cfg: dict[str, Any],
             layer: int, n_top: int, out_h5: str, out_top: str) -> None:
    manifest = models.read_manifest(model_json)
    selection = read_json(selection_path)
    K_all, pool, key_attrs = keys_mod.read_keys(keys_path, model=manifest["name"], layer=layer, d_m=manifest["d_m"])
    if pool[: len(selection["selected"])] != selection["selected"]:
        raise ProvenanceError(f"{keys_path} holds keys of other facts than {selection_path} selects; rerun keys")
    m = len(selection["selected"])
    K = K_all[:m]
    w, w_attrs = whitening_mod.read_whitening(whitening_path, model=manifest["name"], layer=layer, d_m=manifest["d_m"])
    mats = matrices_mod.superposition_matrices(K, w.cholesky)
    record = {**models.provenance_of(manifest), **environment(), "layer": layer, "ridge": w.ridge,
              "corpus_fingerprint": w_attrs["corpus_fingerprint"], "n_tokens": w_attrs["n_tokens"],
              "facts": selection["facts"]}
    matrices_mod.write_matrices(out_h5, mats, selection["selected"], record)
    facts, _ = facts_mod.load_facts({**facts_cfg, "case_ids": selection["selected"]})
    P, W, A = mats["P"], mats["W"], mats["A"]
    with atomic_path(out_top) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
            writer.writerow(TOP_PAIR_COLUMNS)
            for rank, (i, j, value) in enumerate(matrices_mod.top_pairs(P, n_top)):
                writer.writerow([rank, f"{value:.6f}", f"{P[j, i]:.6f}", f"{W[i, j]:.6f}", f"{A[i, j]:.6f}",
                                 facts[i].case_id, facts[i].subject, facts[i].text,
                                 facts[j].case_id, facts[j].subject, facts[j].text])
    off = matrices_mod.off_diagonal(P)
    print(f"layer {layer}: m={m}, off-diagonal P mean {off.mean():.4f}, max {off.max():.4f}")


# ---------------------------------------------------------------------------------------- summaries


def _angle_grid() -> np.ndarray:
    return np.linspace(0.0, 180.0, 361)


def summaries(model_json: str, matrix_paths: Sequence[str], layers: Sequence[int], selection_path: str,
              kde_grid: Sequence[float], out_tsv: str, out_kde: str) -> None:
    from . import summaries as summ

    manifest = models.read_manifest(model_json)
    selection = read_json(selection_path)
    grid = np.linspace(float(kde_grid[0]), float(kde_grid[1]), int(kde_grid[2]))
    rows, curves, angle_curves, q_grids = [], {"P": {}, "W": {}, "A": {}, "Q": {}}, {"W": {}, "A": {}}, {}
    for layer, path in zip(layers, matrix_paths):
        mats, _, attrs = matrices_mod.read_matrices(path, model=manifest["name"], layer=layer,
                                                    case_ids=selection["selected"])
        rows.append(summ.layer_row(layer, mats, attrs.get("n_tokens")))
        for name in ("P", "W", "A"):
            curves[name][layer] = summ.kde(matrices_mod.off_diagonal(mats[name]), grid)
        q_off = matrices_mod.off_diagonal(mats["Q"])
        pad = 0.1 * (q_off.max() - q_off.min())
        q_grids[layer] = np.linspace(q_off.min() - pad, q_off.max() + pad, len(grid))
        curves["Q"][layer] = summ.kde(q_off, q_grids[layer])
        for name in ("W", "A"):
            angle_curves[name][layer] = summ.kde(summ.angles_deg(matrices_mod.off_diagonal(mats[name])), _angle_grid())
    summ.write_table(out_tsv, rows, summ.columns())
    summ.write_kdes(out_kde, grid, curves, _angle_grid(), angle_curves, q_grids,
                    {**models.provenance_of(manifest), **environment(), "layers": list(layers),
                     "case_ids": selection["selected"]})
    print(f"{manifest['name']}: summarised {len(rows)} layers")


def study_layers(layers: Sequence[int]) -> list[int]:
    """First, middle and last of the analysed layers (the kurtosis-vs-m study)."""
    layers = sorted(layers)
    return sorted({layers[0], layers[len(layers) // 2], layers[-1]})


def kurtosis_vs_m(model_json: str, keys_path: str, whitening_paths: Sequence[str], layers: Sequence[int],
                  m_values: Sequence[int], out_tsv: str) -> None:
    from . import summaries as summ

    manifest = models.read_manifest(model_json)
    rows = []
    for layer, path in zip(layers, whitening_paths):
        K, pool, _ = keys_mod.read_keys(keys_path, model=manifest["name"], layer=layer, d_m=manifest["d_m"])
        w, _ = whitening_mod.read_whitening(path, model=manifest["name"], layer=layer, d_m=manifest["d_m"])
        for m, kurt in summ.kurtosis_vs_m(K, w.cholesky, [*m_values, len(pool)]):
            rows.append({"layer": layer, "m": m, "all_known": int(m == len(pool)), "P_excess_kurtosis": kurt})
    summ.write_table(out_tsv, rows, ["layer", "m", "all_known", "P_excess_kurtosis"])


# ------------------------------------------------------------------------------------------ figures


def _label(model_json: str) -> tuple[str, float]:
    manifest = models.read_manifest(model_json)
    params = manifest.get("params_millions") or manifest.get("n_params", 0) / 1e6
    from .plots import model_label

    return model_label(manifest["name"], params), params


def figure_heatmaps(model_json: str, matrix_paths: Sequence[str], layers: Sequence[int], png: str, pdf: str,
                    dpi: int) -> None:
    from . import plots

    manifest = models.read_manifest(model_json)
    Ps = {layer: matrices_mod.read_matrices(p, model=manifest["name"], layer=layer)[0]["P"]
          for layer, p in zip(layers, matrix_paths)}
    plots.heatmap_grid(Ps, _label(model_json)[0], png, pdf, dpi)


def figure_kde(model_json: str, kde_path: str, png: str, pdf: str, dpi: int) -> None:
    import h5py

    from . import plots

    with h5py.File(kde_path) as f:
        grid = f["grid"][()]
        curves = {int(k.split("_")[1]): f["P"][k][()] for k in f["P"]}
    plots.kde_per_layer(grid, curves, _label(model_json)[0], png, pdf, dpi)


def _first_layer(kde_path: str, group: str, which: str = "first") -> tuple[int, Any]:
    import h5py

    with h5py.File(kde_path) as f:
        layers = sorted(int(k.split("_")[1]) for k in f[group])
        layer = layers[0] if which == "first" else layers[-1]
        return layer, f[group][f"layer_{layer}"][()]


def figure_across_models(model_jsons: Sequence[str], matrix_paths: Sequence[str], layers: Sequence[int],
                         png: str, pdf: str, dpi: int) -> None:
    """Fig. 3: the first analysed layer (layer 0 by default) of every model, ordered by size."""
    from . import plots

    panels = []
    for mj, path, layer in zip(model_jsons, matrix_paths, layers):
        name = models.read_manifest(mj)["name"]
        label, params = _label(mj)
        P = matrices_mod.read_matrices(path, model=name, layer=layer)[0]["P"]
        panels.append((params, f"{label}, layer {layer}", P))
    panels.sort(key=lambda t: t[0])
    plots.heatmaps_across_models([(t, P) for _, t, P in panels], _layer_text(layers), png, pdf, dpi)


def _layer_text(layers: Sequence[int]) -> str:
    return f"layer {layers[0]}" if len(set(layers)) == 1 else "the first analysed layer"


def figure_kde_across_models(model_jsons: Sequence[str], kde_paths: Sequence[str], png: str, pdf: str,
                             dpi: int) -> None:
    import h5py

    from . import plots

    curves, layers, grid = [], [], None
    for mj, path in zip(model_jsons, kde_paths):
        label, params = _label(mj)
        layer, density = _first_layer(path, "P")
        with h5py.File(path) as f:
            grid = f["grid"][()]
        curves.append((params, f"{label}, layer {layer}", density))
        layers.append(layer)
    curves.sort(key=lambda t: t[0])
    plots.kde_across_models(grid, [(t, d) for _, t, d in curves], _layer_text(layers), png, pdf, dpi)


def figure_kurtosis_vs_layer(model_jsons: Sequence[str], tables: Sequence[str], png: str, pdf: str, dpi: int) -> None:
    from . import plots
    from .summaries import read_table

    series = []
    for mj, table in zip(model_jsons, tables):
        label, params = _label(mj)
        rows = read_table(table)
        series.append((params, label, np.array([int(r["layer"]) for r in rows]),
                       np.array([float(r["P_excess_kurtosis"]) for r in rows])))
    series.sort(key=lambda t: t[0])
    plots.kurtosis_vs_layer([s[1:] for s in series], png, pdf, dpi)


def figure_angles(model_jsons: Sequence[str], kde_paths: Sequence[str], png: str, pdf: str, dpi: int) -> None:
    import h5py

    from . import plots

    panels = []
    for mj, path in zip(model_jsons, kde_paths):
        label, params = _label(mj)
        layer, white = _first_layer(path, "W_angle", "last")
        with h5py.File(path) as f:
            act = f["A_angle"][f"layer_{layer}"][()]
            grid = f["angle_grid_deg"][()]
        panels.append((params, f"{label}, layer {layer}", grid, white, act))
    panels.sort(key=lambda t: t[0])
    plots.angle_distributions([p[1:] for p in panels], png, pdf, dpi)


def figure_kurtosis_vs_m(model_json: str, table: str, png: str, pdf: str, dpi: int) -> None:
    from . import plots
    from .summaries import read_table

    rows = read_table(table)
    series = []
    for layer in sorted({int(r["layer"]) for r in rows}):
        sel = [r for r in rows if int(r["layer"]) == layer]
        series.append((f"layer {layer}", np.array([int(r["m"]) for r in sel]),
                       np.array([float(r["P_excess_kurtosis"]) for r in sel])))
    plots.kurtosis_vs_m(series, _label(model_json)[0], png, pdf, dpi)


def export_rome(model_json: str, covariance_path: str, corpus_manifest: str, layer: int, out_npz: str) -> None:
    manifest = models.read_manifest(model_json)
    C, attrs = stats_mod.read_covariance(covariance_path, model=manifest["name"], layer=layer, d_m=manifest["d_m"])
    corpus = read_json(corpus_manifest)
    if attrs["corpus_fingerprint"] != corpus["corpus_fingerprint"]:
        raise ProvenanceError(f"{covariance_path} was computed on another corpus than {corpus_manifest}")
    stats_mod.export_rome_npz(out_npz, C, int(attrs["n_tokens"]), int(corpus["corpus_documents"]))


def rome_module(model_json: str, layer: int) -> str:
    manifest = models.read_manifest(model_json)
    return models.family_for(manifest["model_type"]).module_name(layer)


def figure_kurtosis_vs_size(model_jsons: Sequence[str], tables: Sequence[str], png: str, pdf: str, dpi: int) -> None:
    from . import plots
    from .summaries import read_table

    points = []
    for mj, table in zip(model_jsons, tables):
        manifest = models.read_manifest(mj)
        _, params = _label(mj)
        kurt = [float(r["P_excess_kurtosis"]) for r in read_table(table)]
        points.append((manifest["family"], manifest["name"], params, kurt[0], float(np.mean(kurt))))
    plots.kurtosis_vs_size(points, png, pdf, dpi)


# ------------------------------------------------------------------------------------------ editing

EDIT_STEP_FIELDS = ["edit_success", "retention", "target_true_prob", "logp_drop_mean", "interference_mean",
                    "interference_max"]


def lifelong_edit(model_json: str, keys_path: str, whitening_path: str, covariance_path: str, selection_path: str,
                  facts_cfg: dict[str, Any], stats_cfg: dict[str, Any], edit_cfg: dict[str, Any], layer: int,
                  out_steps: str, out_facts: str, out_h5: str) -> None:
    import h5py

    from . import editing
    from .provenance import set_attrs
    from .summaries import write_table

    cfg = editing.EditConfig.from_config(edit_cfg)
    manifest = models.read_manifest(model_json)
    name, d_m = manifest["name"], manifest["d_m"]
    selection = read_json(selection_path)
    K_pool, pool, _ = keys_mod.read_keys(keys_path, model=name, layer=layer, d_m=d_m)
    if pool != selection["pool"]:
        raise ProvenanceError(f"{keys_path} holds keys of other facts than {selection_path} selects; rerun keys")
    w, w_attrs = whitening_mod.read_whitening(whitening_path, model=name, layer=layer, d_m=d_m)
    C, c_attrs = stats_mod.read_covariance(covariance_path, model=name, layer=layer, d_m=d_m)
    if c_attrs["corpus_fingerprint"] != w_attrs["corpus_fingerprint"]:
        raise ProvenanceError(f"{covariance_path} and {whitening_path} come from different corpora")
    all_facts, _ = facts_mod.load_facts({**facts_cfg, "case_ids": None})
    by_id = {f.case_id: f for f in all_facts}
    pool_facts = [by_id[c] for c in pool]

    model, tokenizer = models.load(manifest, stats_cfg.get("device", "auto"), "float32")
    module = models.key_module(model, layer)
    # retention is measured on the other selected facts (those in the matrices) or on every known fact of the pool
    candidates = pool_facts[: len(selection["selected"])] if cfg.retained == "selected" else pool_facts
    edits, edit_rows, retained_rows = editing.plan_edits(candidates, all_facts, cfg.n_edits, tokenizer)
    retained = [pool_facts[i] for i in retained_rows]
    P_pool = editing.pool_p_matrix(K_pool, w.cholesky)
    projector, null_dim, eigenvalues = editing.null_space_projector(C + w.ridge * np.eye(d_m), cfg.null_space_threshold)
    if null_dim == 0:
        raise editing.EditingError(
            f"{name} layer {layer}: no eigenvalue of C is below editing.null_space_threshold="
            f"{cfg.null_space_threshold:g} (smallest {eigenvalues[0]:.3e}): raise the threshold")
    print(f"{name} layer {layer}: {len(edits)} edits, {len(retained)} retained facts; null space of C below "
          f"{cfg.null_space_threshold:g}: {null_dim} of {d_m} dimensions")

    runs = {}
    for method in editing.METHODS:
        runs[method] = editing.run_sequence(model, tokenizer, module, method, edits, retained, K_pool, edit_rows,
                                            retained_rows, w.cholesky, P_pool, projector, cfg)
        sys.stdout.flush()

    # steps table: one row per evaluation, the columns of both methods side by side
    rows = []
    for i, base in enumerate(runs["closed_form"].steps):
        row = {"step": i, "n_edits": base["n_edits"]}
        for method, run in runs.items():
            for key, value in run.steps[i].items():
                if key != "n_edits":
                    row[f"{method}_{key}"] = value
        rows.append(row)
    columns = ["step", "n_edits"] + [f"{m}_{k}" for m in editing.METHODS for k in EDIT_STEP_FIELDS] \
        + ["closed_form_prediction_rel_error"]
    write_table(out_steps, rows, columns)

    # per-fact table after the whole sequence
    cf, ns = runs["closed_form"], runs["null_space"]
    predicted_norm = np.linalg.norm(cf.final_predicted, axis=0)
    fact_rows = []
    for order, (fact, row) in enumerate(zip(edits, edit_rows)):
        fact_rows.append({"case_id": fact.case_id, "role": "edited", "edit_order": order + 1, "subject": fact.subject,
                          "prompt": fact.text, "target_true": fact.target_true, "target_new": fact.target_new,
                          "value_steps": cf.value_steps[order], "value_nll": cf.value_nll[order],
                          "delta_norm": float(np.linalg.norm(cf.deltas[order])),
                          "closed_form_success": int(cf.final_success[order]),
                          "null_space_success": int(ns.final_success[order])})
    for j, row in enumerate(retained_rows):
        fact = pool_facts[row]
        fact_rows.append({"case_id": fact.case_id, "role": "retained", "subject": fact.subject, "prompt": fact.text,
                          "target_true": fact.target_true,
                          "closed_form_predicted_interference": float(predicted_norm[row]),
                          "closed_form_relative_interference": float(predicted_norm[row] / cf.base_out_norm[row]),
                          "closed_form_measured_interference": float(np.linalg.norm(cf.final_dv[:, row])),
                          "closed_form_logp_drop": float(cf.base_logp[j] - cf.final_logp[j]),
                          "closed_form_forgotten": int(not cf.final_known[j]),
                          "null_space_measured_interference": float(np.linalg.norm(ns.final_dv[:, row])),
                          "null_space_logp_drop": float(ns.base_logp[j] - ns.final_logp[j]),
                          "null_space_forgotten": int(not ns.final_known[j])})
    fact_columns = ["case_id", "role", "edit_order", "subject", "prompt", "target_true", "target_new", "value_steps",
                    "value_nll", "delta_norm", "closed_form_success", "null_space_success",
                    "closed_form_predicted_interference", "closed_form_relative_interference",
                    "closed_form_measured_interference",
                    "closed_form_logp_drop", "closed_form_forgotten", "null_space_measured_interference",
                    "null_space_logp_drop", "null_space_forgotten"]
    write_table(out_facts, fact_rows, fact_columns)

    timing = {f"{m}_seconds_per_edit": float(np.mean(r.edit_seconds)) for m, r in runs.items()}
    timing.update({f"{m}_seconds_per_evaluation": float(np.mean(r.eval_seconds)) for m, r in runs.items()})
    record = {**models.provenance_of(manifest), **environment(), "layer": layer, "ridge": w.ridge,
              "corpus_fingerprint": w_attrs["corpus_fingerprint"], "n_tokens": w_attrs["n_tokens"],
              "facts": selection["facts"], "null_space_dim": null_dim, "editing": dataclasses.asdict(cfg),
              "key_mismatch_max": max(r.key_mismatch for r in runs.values()), **timing}
    with atomic_path(out_h5) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("pool_case_ids", data=np.asarray(pool, dtype=np.int64))
            f.create_dataset("edit_rows", data=np.asarray(edit_rows, dtype=np.int64))
            for method, run in runs.items():
                g = f.create_group(method)
                g.create_dataset("deltas", data=np.asarray(run.deltas))  # (n_edits, d_out) float64
                g.create_dataset("measured_dv", data=run.final_dv)  # (d_out, n_pool): (W_n - W_0) K
                if cfg.save_weights:  # the edited layer is W_0 + weight_change (W_0: the snapshot's weights)
                    g.create_dataset("weight_change", data=run.weight_change, compression="gzip")
            f["closed_form"].create_dataset("predicted_dv", data=cf.final_predicted)
            set_attrs(f, record)
    print(f"{name} layer {layer}: " + ", ".join(f"{k} {v:.2f}" for k, v in timing.items()))


def figure_editing(model_json: str, steps_tsv: str, facts_tsv: str, layer: int, curves_png: str, curves_pdf: str,
                   scatter_png: str, scatter_pdf: str, separation_tsv: str, dpi: int) -> None:
    from . import plots
    from .editing import METHODS
    from .summaries import interference_separation, read_table, write_table

    label = _label(model_json)[0]
    steps = read_table(steps_tsv)
    n = np.array([int(r["n_edits"]) for r in steps])
    series = {}
    for method in METHODS:
        series[method] = {key: np.array([float(r[f"{method}_{key}"]) if r[f"{method}_{key}"] else np.nan
                                         for r in steps]) for key in ("edit_success", "retention")}
    plots.editing_curves(n, series, f"{label}, layer {layer}", curves_png, curves_pdf, dpi)
    # the prediction sum_i p(k_ei, k_j) delta_i exists for the closed-form updates only
    retained = [r for r in read_table(facts_tsv) if r["role"] == "retained"]
    interference = np.array([float(r["closed_form_relative_interference"]) for r in retained])
    logp_drop = np.array([float(r["closed_form_logp_drop"]) for r in retained])
    forgotten = np.array([r["closed_form_forgotten"] == "1" for r in retained])
    separation = interference_separation(interference, logp_drop, forgotten)
    row = {"model": models.read_manifest(model_json)["name"], "layer": layer, "n_edits": int(n[-1]),
           "method": "closed_form", **separation}
    write_table(separation_tsv, [row], list(row))
    print(", ".join(f"{k} {v}" for k, v in row.items()))
    plots.interference_scatter(interference, logp_drop, forgotten, separation,
                               f"{label}, layer {layer}, {int(n[-1])} edits", scatter_png, scatter_pdf, dpi)
