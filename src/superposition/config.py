"""Config checks the JSON schema cannot express, and the per-model layer plan the DAG is built from.

Imported by ``rules/common.smk`` at DAG-build time, so it must stay cheap: no torch, no transformers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .models import ModelSpec, UnsupportedModelError, check_layers, family_for

DEFAULT_RESULTS = "results"


class ConfigError(ValueError):
    pass


def model_specs(config: dict[str, Any]) -> dict[str, ModelSpec]:
    models = config.get("models") or {}
    if not models:
        raise ConfigError("config key 'models' is empty: name at least one model")
    return {name: ModelSpec.from_config(name, entry or {}) for name, entry in models.items()}


def checkpoint_config(spec: ModelSpec) -> dict[str, Any] | None:
    """The checkpoint's config.json before any snapshot: a local model's, or a hub model's already in the HF cache."""
    candidates = []
    if spec.source == "local":
        candidates.append(Path(spec.path).expanduser() / "config.json")
    if spec.source == "hub":
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(spec.id, "config.json", revision=spec.revision)
            if isinstance(cached, str):
                candidates.append(Path(cached))
        except Exception:  # noqa: BLE001 - the cache is only a shortcut
            pass
    for path in candidates:
        if path.is_file():
            return json.loads(path.read_text())
    return None


def n_layers_of(spec: ModelSpec, results: str | Path = DEFAULT_RESULTS) -> int:
    """Layer count without loading the model: config, an existing snapshot manifest, or a local config.json."""
    manifest = Path(results) / "models" / spec.name / "model.json"
    snapshot_layers = int(json.loads(manifest.read_text())["n_layers"]) if manifest.is_file() else None
    if spec.n_layers is not None:
        if snapshot_layers is not None and snapshot_layers != spec.n_layers:
            raise ConfigError(f"models.{spec.name}.n_layers is {spec.n_layers} but the snapshot {manifest} has "
                              f"{snapshot_layers} layers: fix n_layers, or delete the snapshot if the model changed")
        return int(spec.n_layers)
    if snapshot_layers is not None:
        return snapshot_layers
    cfg = checkpoint_config(spec)
    text = (cfg or {}).get("text_config", cfg or {})
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if key in text:
            return int(text[key])
    raise ConfigError(
        f"models.{spec.name}: cannot tell its layer count before it is downloaded; set models.{spec.name}.n_layers"
    )


def check_d_m(config: dict[str, Any], name: str) -> None:
    """models.<name>.d_m, when set, must be the snapshot's (the jobs are sized and checked from it)."""
    d_m = (config["models"][name] or {}).get("d_m")
    manifest = Path(config.get("results", DEFAULT_RESULTS)) / "models" / name / "model.json"
    if d_m is None or not manifest.is_file():
        return
    snapshot_d_m = int(json.loads(manifest.read_text())["d_m"])
    if snapshot_d_m != int(d_m):
        raise ConfigError(f"models.{name}.d_m is {d_m} but the snapshot {manifest} has d_m {snapshot_d_m}: fix d_m, "
                          f"or delete the snapshot if the model changed")


def model_layers(config: dict[str, Any], name: str) -> list[int]:
    """Layers to analyse for one model (``layers: all`` or a list; a model entry may override)."""
    spec = model_specs(config)[name]
    n_layers = n_layers_of(spec, config.get("results", DEFAULT_RESULTS))
    entry = config["models"][name] or {}
    wanted = entry.get("layers", config.get("layers", "all"))
    if wanted == "all":
        return list(range(n_layers))
    if not isinstance(wanted, list) or not wanted:
        key = f"models.{name}.layers" if "layers" in entry else "layers"
        raise ConfigError(f"{key} must be 'all' or a non-empty list of integers, got {wanted!r}")
    check_layers(wanted, n_layers, name)
    return sorted(set(int(x) for x in wanted))


def block_name(layers: list[int]) -> str:
    """A layer block's name in file names: its layers as ranges, e.g. [0, 1, 2, 5, 7, 8] -> '0-2_5_7-8'."""
    layers = sorted(set(int(x) for x in layers))
    parts, start = [], layers[0]
    for prev, cur in zip(layers, layers[1:] + [None]):
        if cur != prev + 1:
            parts.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = cur
    return "_".join(parts)


def block_layers(name: str) -> list[int]:
    """Inverse of ``block_name``."""
    out: list[int] = []
    for part in name.split("_"):
        a, _, b = part.partition("-")
        out.extend(range(int(a), int(b or a) + 1))
    return out


def existing_blocks(results: str | Path, name: str) -> list[list[int]]:
    """Layer blocks whose statistics already exist on disk for model ``name`` (any shard)."""
    import re

    found = set()
    for path in (Path(results) / "stats" / name).glob("shard-*.block-*.h5"):
        hit = re.fullmatch(r"shard-\d+\.block-([\d_-]+)\.h5", path.name)
        if hit:
            found.add(hit.group(1))
    return [block_layers(b) for b in sorted(found)]


def plan_blocks(layers: list[int], size: int | None, existing: list[list[int]] = ()) -> list[list[int]]:
    """Layer blocks of the statistics jobs.

    Blocks whose statistics exist are reused for the layers they hold, so adding layers to a finished run only
    runs statistics for the new layers and leaves every existing layer's covariance (and all after it) alone.
    The remaining layers form new blocks: one for all of them, or chunks of ``size`` (large models).
    """
    wanted = sorted(set(layers))
    blocks, covered = [], set()
    for block in sorted(existing, key=lambda b: (-len(set(b) & set(wanted)), b)):
        if set(block) & (set(wanted) - covered):
            blocks.append(sorted(block))
            covered |= set(block)
    rest = [layer for layer in wanted if layer not in covered]
    if rest:
        step = size or len(rest)
        blocks.extend(rest[i:i + step] for i in range(0, len(rest), step))
    return sorted(blocks)


def layer_blocks(config: dict[str, Any], name: str) -> tuple[list[list[int]], list[str]]:
    """Layer blocks of one model's statistics jobs (see ``plan_blocks``) and notes for the log.

    The plan is the config's (the analysed layers in chunks of ``layer_block_size``) except where statistics
    blocks already exist on disk: those are reused, and the notes say so, naming the blocks, so that a changed
    block size never goes unnoticed (it applies to layers without statistics only).
    """
    layers = model_layers(config, name)
    size = (config["models"][name] or {}).get("layer_block_size", (config.get("stats") or {}).get("layer_block_size"))
    existing = existing_blocks(config.get("results", DEFAULT_RESULTS), name)
    blocks = plan_blocks(layers, size, existing)
    fresh = plan_blocks(layers, size)
    notes = []
    if blocks != fresh:
        reused = [block_name(b) for b in blocks if b in existing]
        notes.append(
            f"{name}: reusing the existing statistics blocks {', '.join(reused)} (results/stats/{name}); the "
            f"configured layer_block_size={size} alone would plan {', '.join(block_name(b) for b in fresh)} and "
            f"applies to layers without statistics only. Delete {config.get('results', DEFAULT_RESULTS)}/stats/"
            f"{name}/ to replan (this recomputes the statistics).")
    return blocks, notes


def study_layers(layers: list[int]) -> list[int]:
    """First, middle and last of the analysed layers (the kurtosis-vs-m study)."""
    layers = sorted(layers)
    return sorted({layers[0], layers[len(layers) // 2], layers[-1]})


def edit_layer(config: dict[str, Any], name: str) -> int:
    """The layer the editing simulation edits in model ``name``: editing.layer, or the middle analysed layer."""
    layers = model_layers(config, name)
    requested = (config.get("editing") or {}).get("layer")
    if requested is None:
        return layers[len(layers) // 2]
    if requested not in layers:
        raise ConfigError(f"editing.layer {requested} is out of range for model {name!r}: its analysed layers are "
                          f"{layers[0]}..{layers[-1]} (the edit needs that layer's C)")
    return int(requested)


def _setting(config: dict[str, Any], name: str) -> Any:
    """The key named ``name`` ("facts.pool_size") in ``config``, or the schema's default."""
    from . import settings

    key = next(k for k in settings.declared_keys() if k.name == name)
    return settings.value_of(config, key)


def _editing_setting(config: dict[str, Any], name: str) -> Any:
    """editing.{name}, or the schema's default."""
    return _setting(config, f"editing.{name}")


def memit_layer_range(edit_layer_: int, n_layers: int) -> list[int]:
    """MEMIT's layers: ``n_layers`` (editing.memit_layers) consecutive layers ending at the edited layer."""
    first = edit_layer_ - n_layers + 1
    if first < 0:
        raise ConfigError(f"editing.memit_layers is {n_layers} but the edited layer is {edit_layer_}: MEMIT's "
                          f"range would start at layer {first}; lower editing.memit_layers or raise editing.layer")
    return list(range(first, edit_layer_ + 1))


def check_memit_batches(eval_every: int, batch_size: int) -> None:
    if eval_every % batch_size:
        raise ConfigError(f"editing.eval_every ({eval_every}) is not a multiple of editing.memit_batch_size "
                          f"({batch_size}): an evaluation would fall inside a MEMIT batch")


def memit_layers(config: dict[str, Any], name: str) -> list[int]:
    """The layers MEMIT edits in model ``name`` (each needs its C), or [] when memit is not in editing.methods."""
    if "memit" not in _editing_setting(config, "methods"):
        return []
    n_layers = _editing_setting(config, "memit_layers")
    layer = edit_layer(config, name)
    wanted = memit_layer_range(layer, n_layers)
    analysed = set(model_layers(config, name))
    missing = [x for x in wanted if x not in analysed]
    if missing:
        raise ConfigError(f"editing.memit_layers is {n_layers}: MEMIT edits layers {wanted[0]}..{layer} of "
                          f"{name!r}, but layers {missing} are not among the analysed layers (each needs its C): "
                          f"add them to layers or lower editing.memit_layers")
    return wanted


def statistics_of(config: dict[str, Any], name: str) -> dict[str, Any]:
    """models.{name}.statistics with its defaults: where the model's C comes from."""
    entry = (config["models"][name] or {}).get("statistics") or {}
    return {"source": entry.get("source") or "computed", "path": entry.get("path"), "n_tokens": entry.get("n_tokens")}


def is_imported(config: dict[str, Any], name: str) -> bool:
    """True when the model's statistics are imported: it has no corpus and no statistics jobs."""
    return statistics_of(config, name)["source"] != "computed"


def model_type_of(config: dict[str, Any], name: str) -> str:
    """The model's family name before its snapshot is needed: the snapshot manifest, the config's model_type, a local
    checkpoint's config.json, or the hub cache (for the module names of imported statistics files)."""
    spec = model_specs(config)[name]
    manifest = Path(config.get("results", DEFAULT_RESULTS)) / "models" / name / "model.json"
    if manifest.is_file():
        return json.loads(manifest.read_text())["model_type"]
    if (config["models"][name] or {}).get("model_type"):
        return config["models"][name]["model_type"]
    cfg = checkpoint_config(spec)
    if cfg is not None and cfg.get("model_type"):
        return cfg["model_type"]
    raise ConfigError(f"models.{name}.statistics: the statistics files are named after the model's modules, but its "
                      f"model_type is not known before the download; set models.{name}.model_type (e.g. llama, gpt2)")


def imported_file(config: dict[str, Any], name: str, layer: int) -> Path:
    """The imported statistics file of one layer (exactly one must match; see stats.rome_file_for)."""
    from . import stats

    source = statistics_of(config, name)
    module = family_for(model_type_of(config, name)).module_name(int(layer))
    try:
        if source["source"] == "rome_npz":
            return stats.rome_file_for(Path(source["path"]).expanduser(), module)
        if source["source"] == "mean_npy":
            return stats.mean_file_for(source["path"], int(layer), module)
    except stats.ImportedStatisticsError as err:
        raise ConfigError(f"models.{name}.statistics.path: {err}") from None
    raise ConfigError(f"models.{name}.statistics.source is {source['source']!r}: nothing is imported")


def _validate_statistics(config: dict[str, Any], name: str) -> None:
    source = statistics_of(config, name)
    if source["source"] == "computed":
        return
    if not source["path"]:
        what = "the folder of ROME's .npz files" if source["source"] == "rome_npz" else \
            "a file pattern with {layer}, e.g. stats/layer-{layer}.npy"
        raise ConfigError(f"models.{name}.statistics.source is {source['source']!r} but models.{name}.statistics.path "
                          f"is not set: name {what}")
    if source["source"] == "mean_npy" and not source["n_tokens"]:
        raise ConfigError(f"models.{name}.statistics.source is 'mean_npy' but models.{name}.statistics.n_tokens is "
                          f"not set: a bare mean needs the number of tokens it was estimated from")
    for layer in model_layers(config, name):
        imported_file(config, name, layer)


def validate(config: dict[str, Any]) -> None:
    """Semantic checks after the JSON schema: every model resolvable, its layers in range, m sensible."""
    try:
        specs = model_specs(config)
    except UnsupportedModelError as err:
        raise ConfigError(str(err)) from None
    for name in specs:
        model_layers(config, name)
        if (config["models"][name] or {}).get("model_type"):
            try:
                family_for(config["models"][name]["model_type"])
            except UnsupportedModelError as err:
                raise ConfigError(f"models.{name}.model_type: {err}") from None
        _validate_statistics(config, name)
        check_d_m(config, name)
    facts = config["facts"]
    if facts.get("case_ids") and facts.get("prompt_mode") == "exclude_first":
        raise ConfigError("facts.prompt_mode exclude_first filters the known-fact selection, which explicit "
                          "facts.case_ids bypass: drop the case_ids, or use prompt_mode bos or context")
    if facts.get("case_ids") and len(facts["case_ids"]) < facts["m"]:
        raise ConfigError(f"facts.case_ids lists {len(facts['case_ids'])} facts but facts.m is {facts['m']}")
    editing = config.get("editing") or {}
    for name in editing.get("models") or []:
        if name not in specs:
            raise ConfigError(f"editing.models names {name!r}, which is not among the configured models "
                              f"{', '.join(specs)}")
    if editing.get("enabled", True):
        for name in editing.get("models") or specs:
            edit_layer(config, name)
            memit_layers(config, name)
        if "memit" in _editing_setting(config, "methods"):
            check_memit_batches(_editing_setting(config, "eval_every"), _editing_setting(config, "memit_batch_size"))
    corpus = config["corpus"]
    if corpus["source"] == "local" and not corpus.get("path"):
        raise ConfigError("corpus.source is 'local' but corpus.path is not set")
    if corpus.get("n_documents") and not corpus.get("n_tokens") and _setting(config, "corpus.n_shards") > corpus["n_documents"]:
        raise ConfigError(f"corpus.n_shards is {_setting(config, 'corpus.n_shards')} but corpus.n_documents is only "
                          f"{corpus['n_documents']}: every shard needs at least one document")
    if _setting(config, "facts.source") == "file" and not facts.get("path"):
        raise ConfigError("facts.source is 'file' but facts.path is not set: name a JSON file of CounterFact-shaped "
                          "records")
    pool_size = _setting(config, "facts.pool_size")
    if pool_size < facts["m"]:
        raise ConfigError(f"facts.pool_size is {pool_size} but facts.m is {facts['m']}: the pool of known "
                          f"facts must hold at least the m selected ones")
    low, high, _ = _setting(config, "summaries.kde_grid")
    if not low < high:
        raise ConfigError(f"summaries.kde_grid is {[low, high, _]}: its minimum must be below its maximum")
