"""keys: the knowledge key of every fact of the pool at every layer of the model."""

from __future__ import annotations

from typing import Any, Sequence

from .. import facts as facts_mod
from .. import keys as keys_mod
from .. import models
from ..provenance import environment, read_json, write_table


def keys(model_json: str, selection_path: str, layers: Sequence[int], facts_cfg: dict[str, Any],
         stats_cfg: dict[str, Any], out_path: str, out_subjects: str, execution: dict[str, Any] | None = None
         ) -> None:
    manifest = models.read_manifest(model_json)
    selection = read_json(selection_path)
    facts, _ = facts_mod.load_facts({**facts_cfg, "case_ids": selection["pool"]})
    model, tokenizer = models.load(manifest, stats_cfg["device"], stats_cfg["model_dtype"])
    mode = facts_cfg["prompt_mode"]
    templates = facts_cfg["context_templates"]
    if mode == "context" and not templates:
        templates = list(keys_mod.CONTEXT_PRESET)
    run = keys_mod.run_prompts(model, tokenizer, facts, layers=list(layers), predictions=False,
                               context_templates=templates, batch_size=facts_cfg["batch_size"],
                               prepend_bos=mode == "bos")
    record = {**models.provenance_of(manifest), **environment(), "facts": selection["facts"],
              "prompt_mode": mode, "context_templates": templates, "model_dtype": stats_cfg["model_dtype"],
              "execution": execution or {}}
    keys_mod.write_keys(out_path, run.keys, selection["pool"], run.token_index, run.token_str, run.first_position,
                        layers, record)
    print(f"keys of {len(facts)} facts at {len(layers)} layers, width {run.keys.shape[-1]}, prompts {mode}")
    selected = set(selection["selected"])
    first = [(f, i) for f, i, flag in zip(facts, run.token_index, run.first_position) if flag and f.case_id in selected]
    write_table(out_subjects, [
        {"case_id": f.case_id, "selected": int(f.case_id in selected), "subject": f.subject, "prompt": f.text,
         "subject_last_index": i, "subject_last_token": t, "first_position": int(b)}
        for f, i, t, b in zip(facts, run.token_index, run.token_str, run.first_position)],
        ["case_id", "selected", "subject", "prompt", "subject_last_index", "subject_last_token", "first_position"])
    if first and mode == "as_is":
        names = ", ".join(f"{f.case_id} ({f.subject!r})" for f, _ in first)
        if any(i == 0 for _, i in first):
            print(f"WARNING: {len(first)} selected facts have their subject's last token at the sequence's first "
                  f"position, where the key measures the position (an attention sink), not the fact: {names}. Set "
                  f"facts.prompt_mode to bos, context or exclude_first to avoid them (README).")
        else:
            print(f"note: {len(first)} selected facts have their subject's last token first after the tokenizer's "
                  f"special tokens (a BOS precedes it, so no attention sink at position 0): {names}")
