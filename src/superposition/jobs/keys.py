"""keys: the knowledge key of every fact of the pool at every layer of the model."""

from __future__ import annotations

from typing import Any, Sequence

from .. import facts as facts_mod
from .. import keys as keys_mod
from .. import models
from ..provenance import environment, read_json


def keys(model_json: str, selection_path: str, layers: Sequence[int], facts_cfg: dict[str, Any],
         stats_cfg: dict[str, Any], out_path: str, execution: dict[str, Any] | None = None) -> None:
    manifest = models.read_manifest(model_json)
    selection = read_json(selection_path)
    facts, _ = facts_mod.load_facts({**facts_cfg, "case_ids": selection["pool"]})
    model, tokenizer = models.load(manifest, stats_cfg["device"], stats_cfg["model_dtype"])
    run = keys_mod.run_prompts(model, tokenizer, facts, layers=list(layers), predictions=False,
                               context_templates=facts_cfg["context_templates"],
                               batch_size=facts_cfg["batch_size"])
    record = {**models.provenance_of(manifest), **environment(), "facts": selection["facts"],
              "context_templates": facts_cfg["context_templates"], "model_dtype": stats_cfg["model_dtype"],
              "execution": execution or {}}
    keys_mod.write_keys(out_path, run.keys, selection["pool"], run.token_index, run.token_str, layers, record)
    print(f"keys of {len(facts)} facts at {len(layers)} layers, width {run.keys.shape[-1]}")
