"""fact_predictions (each fact's greedy next token) and known_facts (the selection every model knows)."""

from __future__ import annotations

from typing import Any, Sequence

from .. import facts as facts_mod
from .. import keys as keys_mod
from .. import models
from ..provenance import ProvenanceError, read_table, write_json, write_table

PREDICTION_COLUMNS = ["case_id", "relation_id", "subject", "prompt", "target_true", "target_token", "predicted_token",
                      "known", "margin", "target_prob", "subject_last_token", "subject_position", "first_position"]


def fact_predictions(model_json: str, facts_cfg: dict[str, Any], stats_cfg: dict[str, Any], out_tsv: str) -> None:
    manifest = models.read_manifest(model_json)
    # every fact of the file: with explicit case_ids the filter (and so this rule) does not run
    facts, _ = facts_mod.load_facts({**facts_cfg, "case_ids": None})
    model, tokenizer = models.load(manifest, stats_cfg["device"], stats_cfg["model_dtype"])
    run = keys_mod.run_prompts(model, tokenizer, facts, layers=[], predictions=True,
                               batch_size=facts_cfg["batch_size"], prepend_bos=facts_cfg["prompt_mode"] == "bos")
    rows = [dict(zip(PREDICTION_COLUMNS, [
        fact.case_id, fact.relation_id or "", fact.subject, fact.prompt, fact.target_true,
        tokenizer.convert_ids_to_tokens(run.target[i]), tokenizer.convert_ids_to_tokens(run.predicted[i]),
        int(run.predicted[i] == run.target[i]), f"{run.margin[i]:.6g}", f"{run.target_prob[i]:.6g}",
        run.token_str[i], run.token_index[i], int(run.first_position[i])])) for i, fact in enumerate(facts)]
    write_table(out_tsv, rows, PREDICTION_COLUMNS)
    print(f"{manifest['name']}: knows {sum(p == t for p, t in zip(run.predicted, run.target))} of {len(facts)} facts")


def read_predictions(path: str) -> list[dict[str, str]]:
    rows = read_table(path)
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
        mode = f"known by all of {', '.join(model_names)} (greedy first token = target)"
        if facts_cfg["prompt_mode"] == "exclude_first":
            # a subject at the sequence's first position in any model: its key measures the position
            first = {c for rows in per_model.values() for c, r in rows.items() if r["first_position"] == "1"}
            known = {name: {c: k and c not in first for c, k in per.items()} for name, per in known.items()}
            mode += f", without the {len(first)} facts whose subject is the prompt's first token"
        pool, counts = facts_mod.select_known(case_ids, known, m)
    pool = pool[: int(facts_cfg["pool_size"])]
    by_id = {f.case_id: f for f in facts}
    margins = [f"margin_{n}" for n in per_model]
    rows = [{"rank": rank, "case_id": c, "selected": int(rank < m), "relation_id": by_id[c].relation_id or "",
             "subject": by_id[c].subject, "prompt": by_id[c].prompt, "target_true": by_id[c].target_true,
             **{f"margin_{n}": per_model[n][c]["margin"] for n in per_model}} for rank, c in enumerate(pool)]
    write_table(out_tsv, rows, ["rank", "case_id", "selected", "relation_id", "subject", "prompt", "target_true",
                                *margins])
    selection = {"facts": facts_id, "mode": mode, "m": m, "pool": pool, "selected": pool[:m],
                 "known_per_model": counts, "n_facts": len(facts)}
    write_json(out_selection, selection)
    print(f"{len(pool)} facts in the pool, first {m} selected; known per model: {counts}")
    return selection
