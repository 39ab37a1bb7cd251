"""lifelong_edit: sequential closed-form, null-space, control and MEMIT edits, and the interference P predicts,
measured in the edited model's own forward pass."""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import numpy as np

from .. import config as config_mod
from .. import editing
from .. import facts as facts_mod
from .. import keys as keys_mod
from .. import models
from .. import stats as stats_mod
from .. import whitening as whitening_mod
from ..provenance import ProvenanceError, environment, read_json, write_h5, write_table


def lifelong_edit(model_json: str, keys_path: str, whitening_path: str, covariance_path: str, selection_path: str,
                  facts_cfg: dict[str, Any], stats_cfg: dict[str, Any], edit_cfg: dict[str, Any], layer: int,
                  out_steps: str, out_facts: str, out_h5: str, memit_whitening: list[str] = ()) -> None:
    """``memit_whitening``: the whitening files of MEMIT's layers (config.memit_layers), lowest first, when memit
    is among editing.methods."""
    cfg = editing.EditConfig.from_config({**edit_cfg, "batch_size": facts_cfg["batch_size"]})
    manifest = models.read_manifest(model_json)
    name, d_m = manifest["name"], manifest["d_m"]
    selection = read_json(selection_path)
    K_pool, pool, _ = keys_mod.read_keys(keys_path, model=models.identity(manifest), layer=layer, d_m=d_m)
    if pool != selection["pool"]:
        raise ProvenanceError(f"{keys_path} holds keys of other facts than {selection_path} selects; rerun keys")
    w, w_attrs = whitening_mod.read_whitening(whitening_path, model=models.identity(manifest), layer=layer, d_m=d_m)
    C, c_attrs = stats_mod.read_covariance(covariance_path, model=models.identity(manifest), layer=layer, d_m=d_m)
    if c_attrs["corpus_fingerprint"] != w_attrs["corpus_fingerprint"]:
        raise ProvenanceError(f"{covariance_path} and {whitening_path} come from different corpora")
    all_facts, _ = facts_mod.load_facts({**facts_cfg, "case_ids": None})
    by_id = {f.case_id: f for f in all_facts}
    pool_facts = [by_id[c] for c in pool]

    memit_layers = None
    if "memit" in cfg.methods:
        wanted = config_mod.memit_layer_range(layer, cfg.memit_layers)
        if len(memit_whitening) != len(wanted):
            raise ProvenanceError(f"MEMIT edits layers {wanted} but {len(memit_whitening)} whitening files were "
                                  f"given: {list(memit_whitening)}")
        memit_layers = {}
        for x, path in zip(wanted, memit_whitening):
            w_x, attrs_x = (w, w_attrs) if x == layer else whitening_mod.read_whitening(
                path, model=models.identity(manifest), layer=x, d_m=d_m)
            if attrs_x["corpus_fingerprint"] != w_attrs["corpus_fingerprint"]:
                raise ProvenanceError(f"{path} and {whitening_path} come from different corpora")
            K_x = K_pool if x == layer else keys_mod.read_keys(keys_path, model=models.identity(manifest), layer=x,
                                                                d_m=d_m)[0]
            memit_layers[x] = editing.MemitLayer(w_x.cholesky, K_x)

    model, tokenizer = models.load(manifest, stats_cfg["device"], "float32")
    module = models.key_module(model, layer)
    # retention is measured on the other selected facts (those in the matrices) or on every known fact of the pool
    candidates = pool_facts[: len(selection["selected"])] if cfg.retained == "selected" else pool_facts
    edits, edit_rows, retained_rows = editing.plan_edits(candidates, all_facts, cfg.n_edits, tokenizer)
    retained = [pool_facts[i] for i in retained_rows]
    P_pool = editing.pool_p_matrix(K_pool, w.cholesky)
    print(f"{name} layer {layer}: {len(edits)} edits, {len(retained)} retained facts; methods {', '.join(cfg.methods)}")
    projector, null_dim, cutoff = None, None, None
    if "null_space" in cfg.methods:
        projector, null_dim, eigenvalues = editing.null_space_projector(
            C + w.ridge * np.eye(d_m), cfg.null_space_threshold, relative=cfg.null_space_relative)
        cutoff = editing.null_space_cutoff(eigenvalues, cfg.null_space_threshold, cfg.null_space_relative)
        setting = (f"editing.null_space_relative={cfg.null_space_relative:g} (x largest {eigenvalues[-1]:.3e})"
                   if cfg.null_space_relative is not None else f"editing.null_space_threshold={cfg.null_space_threshold:g}")
        if null_dim == 0:
            raise editing.EditingError(
                f"{name} layer {layer}: no eigenvalue of C is below {setting}, i.e. {cutoff:.3e} (smallest "
                f"{eigenvalues[0]:.3e}): raise it")
        print(f"{name} layer {layer}: null space of C below {cutoff:.3e} ({setting}): {null_dim} of {d_m} dimensions")

    setup = editing.EditSetup(model, tokenizer, module, K_pool, retained_rows, w.cholesky, P_pool, cfg,
                              projector=projector, memit_layers=memit_layers)
    if memit_layers:
        print(f"{name}: MEMIT edits layers {sorted(memit_layers)} in batches of {cfg.memit_batch_size} "
              f"(lambda {cfg.memit_mom2_weight:g})")
    runs = editing.run_methods(setup, cfg.methods, edits, edit_rows, retained)
    sys.stdout.flush()
    first = runs[cfg.methods[0]]

    # steps table: one row per evaluation, the configured methods' columns side by side
    rows = []
    for i, base in enumerate(first.steps):
        row = {"step": i, "n_edits": base["n_edits"]}
        for method, run in runs.items():
            for key, value in run.steps[i].items():
                if key != "n_edits":
                    row[f"{method}_{key}"] = value
        rows.append(row)
    columns = ["step", "n_edits"] + [f"{m}_{k}" for m in cfg.methods for k in editing.step_fields(m)]
    write_table(out_steps, rows, columns)

    # per-fact table after the whole sequence; the value search's numbers are those of the first method's run
    fact_rows = []
    for order, (fact, row) in enumerate(zip(edits, edit_rows)):
        out = {"case_id": fact.case_id, "role": "edited", "edit_order": order + 1, "subject": fact.subject,
               "prompt": fact.text, "target_true": fact.target_true, "target_new": fact.target_new,
               "value_steps": first.value_steps[order], "value_nll": first.value_nll[order],
               "delta_norm": float(np.linalg.norm(first.deltas[order]))}
        if cfg.kl_factor:
            out["value_kl"] = first.value_kl[order]
        out.update({f"{m}_success": int(r.final_success[order]) for m, r in runs.items()})
        if "control" in runs:
            out["control_key_gain"] = runs["control"].key_gain[order]
        fact_rows.append(out)
    for j, row in enumerate(retained_rows):
        fact = pool_facts[row]
        out = {"case_id": fact.case_id, "role": "retained", "subject": fact.subject, "prompt": fact.text,
               "target_true": fact.target_true}
        if "closed_form" in runs:
            predicted = float(np.linalg.norm(runs["closed_form"].final_predicted[:, row]))
            out["closed_form_predicted_interference"] = predicted
            out["closed_form_relative_interference"] = predicted / float(runs["closed_form"].base_out_norm[row])
        for m, r in runs.items():
            out[f"{m}_measured_interference"] = float(np.linalg.norm(r.final_measured[:, j]))
            out[f"{m}_consistency_interference"] = float(np.linalg.norm(r.consistency_dv[:, row]))
            out[f"{m}_last_hidden_change"] = float(r.final_hidden_change[j])
            out[f"{m}_logp_drop"] = float(r.base_logp[j] - r.final_logp[j])
            out[f"{m}_forgotten"] = int(not r.final_known[j])
        fact_rows.append(out)
    fact_columns = ["case_id", "role", "edit_order", "subject", "prompt", "target_true", "target_new", "value_steps",
                    "value_nll"] + (["value_kl"] if cfg.kl_factor else []) + ["delta_norm"] \
        + [f"{m}_success" for m in cfg.methods] \
        + (["control_key_gain"] if "control" in runs else []) \
        + (["closed_form_predicted_interference", "closed_form_relative_interference"] if "closed_form" in runs else []) \
        + [f"{m}_{k}" for m in cfg.methods for k in ("measured_interference", "consistency_interference",
                                                     "last_hidden_change", "logp_drop", "forgotten")]
    write_table(out_facts, fact_rows, fact_columns)

    timing = {f"{m}_seconds_per_edit": float(np.mean(r.edit_seconds)) for m, r in runs.items()}
    timing.update({f"{m}_seconds_per_evaluation": float(np.mean(r.eval_seconds)) for m, r in runs.items()})
    record = {**models.provenance_of(manifest), **environment(), "layer": layer, "ridge": w.ridge,
              "corpus_fingerprint": w_attrs["corpus_fingerprint"], "n_tokens": w_attrs["n_tokens"],
              "facts": selection["facts"], "methods": list(cfg.methods), "editing": dataclasses.asdict(cfg),
              "key_mismatch_max": max(r.key_mismatch for r in runs.values()), **timing}
    if memit_layers:
        # MEMIT's lower-layer edits move later facts' keys at the edited layer on purpose: recorded apart
        record.update({"memit_layers": sorted(memit_layers), "memit_key_drift_max": runs["memit"].key_drift})
    if null_dim is not None:
        record.update({"null_space_dim": null_dim, "null_space_cutoff": cutoff})
    datasets: dict[str, Any] = {"pool_case_ids": np.asarray(pool, dtype=np.int64),
                                "edit_rows": np.asarray(edit_rows, dtype=np.int64),
                                "retained_rows": np.asarray(retained_rows, dtype=np.int64)}
    compress = []
    for method, run in runs.items():
        datasets[f"{method}/deltas"] = np.asarray(run.deltas)  # (n_edits, d_out) float64
        # measured: the edited layer's output change at the retained facts' subject tokens (hooked forward)
        datasets[f"{method}/measured_dv"] = run.final_measured  # (d_out, n_retained)
        datasets[f"{method}/last_hidden_change"] = run.final_hidden_change  # (n_retained,) relative
        datasets[f"{method}/consistency_dv"] = run.consistency_dv  # (d_out, n_pool): (W_n - W_0) K, algebra
        if method == "closed_form":
            datasets[f"{method}/predicted_dv"] = run.final_predicted  # (d_out, n_pool): sum_i p delta_i
        if method == "control":
            datasets[f"{method}/key_gain"] = np.asarray(run.key_gain)  # (n_edits,) u^T k_e
        if cfg.save_weights:  # the edited layer is W_0 + weight_change (W_0: the snapshot's weights)
            changes = {f"{method}/weight_change": run.weight_change}
            if method == "memit":  # every layer MEMIT edits
                changes.update({f"{method}/layer_changes/{x}": change for x, change in run.layer_changes.items()})
            datasets.update(changes)
            compress += list(changes)
    write_h5(out_h5, datasets, record, compress=compress)
    print(f"{name} layer {layer}: " + ", ".join(f"{k} {v:.2f}" for k, v in timing.items()))
