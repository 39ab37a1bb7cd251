"""lifelong_edit: sequential closed-form and null-space edits of one layer, and the interference P predicts."""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import h5py
import numpy as np

from .. import editing
from .. import facts as facts_mod
from .. import keys as keys_mod
from .. import models
from .. import stats as stats_mod
from .. import whitening as whitening_mod
from ..provenance import ProvenanceError, atomic_path, environment, read_json, set_attrs, write_table


EDIT_STEP_FIELDS = ["edit_success", "retention", "target_true_prob", "logp_drop_mean", "interference_mean",
                    "interference_max"]


def lifelong_edit(model_json: str, keys_path: str, whitening_path: str, covariance_path: str, selection_path: str,
                  facts_cfg: dict[str, Any], stats_cfg: dict[str, Any], edit_cfg: dict[str, Any], layer: int,
                  out_steps: str, out_facts: str, out_h5: str) -> None:
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

    model, tokenizer = models.load(manifest, stats_cfg["device"], "float32")
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
