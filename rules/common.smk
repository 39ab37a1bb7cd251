# Config validation and the helpers that turn the config into file lists. No rules here.

from snakemake.exceptions import WorkflowError
from snakemake.logging import logger
from snakemake.utils import min_version, validate

from pathlib import Path

from superposition import config as sp_config
from superposition import settings as sp_settings
from superposition import sizing as sp_sizing
from superposition.fingerprint import code_params

min_version("9.0")


# A --configfile that names its own models is a complete config (e.g. config/paper.yaml); otherwise the
# embedded default is the base that --config/--configfile values extend.
if "models" not in config:

    configfile: "config/config.yaml"


validate(config, str(sp_settings.SCHEMA_PATH))
try:
    sp_config.validate(config)
except (sp_config.ConfigError, ValueError, IndexError) as err:
    raise WorkflowError(f"config error: {err}")

RESULTS = config["results"]
# sorted: the order of the models in the config means nothing (reordering it reruns nothing)
MODELS = sorted(config["models"])
SHARDS = list(range(config["corpus"]["n_shards"]))
USE_KNOWN_FILTER = not config["facts"].get("case_ids")

# What each rule's outputs depend on is derived, never listed: one param per result key of the config the rule
# reads (declared in the schema) and one per library module its script reaches (superposition.fingerprint).
# Execution keys (batching, checkpoints, device) are not params: the jobs read them from the config and record
# them in their artifacts' provenance.
SCRIPTS = Path(workflow.basedir) / "workflow" / "scripts"


def rule_params(rule):
    """Params of ``rule``: its result keys as 'facts.m = 128' and its code as 'superposition.stats code <hash>'."""
    return {
        **sp_settings.result_params(config, rule),
        **code_params(SCRIPTS / f"{rule}.py"),
    }


wildcard_constraints:
    model="|".join(MODELS),
    layer=r"\d+",
    shard=r"\d+",
    block=r"\d+(-\d+)?(_\d+(-\d+)?)*",


def res(path):
    """A path below the results directory."""
    return f"{RESULTS}/{path}"


def layers_of(model):
    return sp_config.model_layers(config, model)


def every_layer_of(model):
    """All layers of the model, configured or not: keys are cheap and are kept for every layer, so adding
    layers to the analysis never reruns the keys (nor, through them, the matrices of the other layers).
    """
    spec = sp_config.model_specs(config)[model]
    return list(range(sp_config.n_layers_of(spec, RESULTS)))


# The statistics blocks of each model: existing blocks are reused (adding layers runs statistics for the new
# layers only); the plan says so when that differs from what the config alone would give.
BLOCKS = {}
for _model in MODELS:
    # imported statistics: no corpus, no statistics jobs
    if sp_config.is_imported(config, _model):
        BLOCKS[_model] = []
        continue
    BLOCKS[_model], _notes = sp_config.layer_blocks(config, _model)
    for _note in _notes:
        logger.info(_note)


def blocks_of(model):
    return BLOCKS[model]


def block_of(model, layer):
    """Name of the statistics block that holds ``layer`` (e.g. '0-29')."""
    for block in blocks_of(model):
        if int(layer) in block:
            return sp_config.block_name(block)
    raise WorkflowError(
        f"layer {layer} is not among the configured layers of {model}: {layers_of(model)}"
    )


def stats_for_layer(wildcards):
    block = block_of(wildcards.model, wildcards.layer)
    return [
        res(f"stats/{wildcards.model}/shard-{shard}.block-{block}.h5")
        for shard in SHARDS
    ]


def covariance_inputs(wildcards):
    """The covariance's inputs: the shards' sums and the corpus manifest, or for a model whose statistics are
    imported (models.<name>.statistics) the layer's source file and the key scale its check compares with.
    """
    model = wildcards.model
    inputs = {"model": res(f"models/{model}/model.json")}
    if sp_config.is_imported(config, model):
        inputs["source"] = str(sp_config.imported_file(config, model, wildcards.layer))
        inputs["key_scale"] = res(f"imports/{model}/key_scale.json")
    else:
        inputs["manifest"] = res(f"corpus/{model}/manifest.json")
        inputs["stats"] = stats_for_layer(wildcards)
    return inputs


def corpus_manifest_of(wildcards):
    """The corpus manifest of a computed model (none for imported statistics)."""
    if sp_config.is_imported(config, wildcards.model):
        return []
    return res(f"corpus/{wildcards.model}/manifest.json")


def prediction_files(wildcards):
    if not USE_KNOWN_FILTER:
        return []
    return [res(f"facts/predictions/{model}.tsv") for model in MODELS]


def facts_input():
    """The facts file as a workflow input, so editing it reruns the fact rules."""
    from superposition.facts import probe_facts_path

    source = config["facts"].get("source", "probe")
    if source == "probe":
        return str(probe_facts_path())
    if config["facts"].get("path"):
        return config["facts"]["path"]
    return []


def all_layer_files(pattern):
    return [res(pattern.format(model=m, layer=l)) for m in MODELS for l in layers_of(m)]


def stats_threads():
    return max(1, workflow.cores or 1)


def matrix_files(model):
    return [res(f"matrices/{model}/layer-{layer}.h5") for layer in layers_of(model)]


def computed_models():
    """Models whose statistics this workflow computes (imported statistics have no corpus segments)."""
    return [m for m in MODELS if not sp_config.is_imported(config, m)]


def resampling_files(wildcards):
    """The per-layer ladder and jackknife of a computed model (none for imported statistics)."""
    if sp_config.is_imported(config, wildcards.model):
        return []
    return [
        res(f"resampling/{wildcards.model}/layer-{layer}.h5")
        for layer in layers_of(wildcards.model)
    ]


def study_layers(model):
    return sp_config.study_layers(layers_of(model))


def first_layer(model):
    return layers_of(model)[0]


def figure(name):
    """PNG (for the report) and PDF (for papers) of one figure."""
    return {"png": res(f"figures/{name}.png"), "pdf": res(f"figures/{name}.pdf")}


def editing_models():
    """Models the lifelong-editing simulation runs on (editing.models; all models by default)."""
    if not config["editing"].get("enabled", True):
        return []
    return config["editing"].get("models") or MODELS


def edit_layer_of(model):
    return sp_config.edit_layer(config, model)


def memit_whitening(wildcards):
    """The whitening files of the layers MEMIT edits (lowest first), none unless memit is in editing.methods."""
    return [
        res(f"whitening/{wildcards.model}/layer-{x}.h5")
        for x in sp_config.memit_layers(config, wildcards.model)
    ]


def editing_figures():
    return [
        res(f"figures/{m}/{kind}.layer-{edit_layer_of(m)}.png")
        for m in editing_models()
        for kind in ("editing_curves", "editing_interference")
    ]


# ---- job sizes from the model's size (superposition.sizing): memory and runtime of the cluster jobs --------------
# The callables below are evaluated when the DAG is built and again when a job is submitted (its inputs exist
# then), so a job of a model whose snapshot exists is sized from its exact d_m and parameter count.


def _read_json_if_file(path):
    import json

    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def size_of(model):
    """superposition.sizing.ModelSize of ``model``: its snapshot manifest when it exists, else its config entry;
    None when nothing tells its size (no params_millions, d_m or snapshot)."""
    entry = config["models"][model] or {}
    spec = sp_config.model_specs(config)[model]
    try:
        return sp_sizing.model_size(
            model,
            params_millions=entry.get("params_millions"),
            n_layers=sp_config.n_layers_of(spec, RESULTS),
            config_d_m=entry.get("d_m"),
            manifest=_read_json_if_file(res(f"models/{model}/model.json")),
        )
    except sp_sizing.SizingError:
        return None


def _unknown(attempt):
    return {k: v * attempt for k, v in sp_sizing.UNKNOWN_SIZE_JOB.items()}


def tokens_of_shard(model):
    manifest = _read_json_if_file(res(f"models/{model}/model.json")) or {}
    return sp_sizing.shard_tokens(
        config["corpus"],
        len(SHARDS),
        manifest.get("context_length"),
        _read_json_if_file(res(f"corpus/{model}/manifest.json")),
    )


def stats_settings():
    return sp_sizing.StatsSettings.from_config(config.get("stats"))


def check_gpu_memory(model, blocks, *, estimated="warn"):
    """Refuse statistics blocks that cannot fit one GPU of ``gpu_memory_gb`` (unset, or stats.device cpu: no check).

    With an estimated d_m (no snapshot, no models.<name>.d_m) a block that would not fit is only warned about:
    the estimate errs on the large side. The same check runs on the exact size when each job is submitted.
    """
    gpu_gb = config.get("gpu_memory_gb")
    if gpu_gb is None or (config.get("stats") or {}).get("device", "auto") == "cpu":
        return
    size = size_of(model)
    if size is None:
        logger.warning(
            f"{model}: gpu_memory_gb is set but nothing tells the model's size before its snapshot: set "
            f"models.{model}.params_millions and d_m to check its statistics blocks"
        )
        return
    named = {sp_config.block_name(b): len(b) for b in blocks}
    try:
        sp_sizing.check_blocks(size, named, gpu_gb, stats_settings())
    except sp_sizing.SizingError as err:
        if size.exact or estimated == "raise":
            raise WorkflowError(f"plan refused: {err}")
        logger.warning(
            f"{err} (d_m {size.d_m} is estimated from params_millions and n_layers: set "
            f"models.{model}.d_m to check exactly; the check is repeated when the snapshot exists)"
        )


for _model in MODELS:
    check_gpu_memory(_model, BLOCKS[_model])


def stats_resources(wildcards, attempt):
    size = size_of(wildcards.model)
    if size is None:
        return _unknown(attempt)
    layers = sp_config.block_layers(wildcards.block)
    if (
        size.exact
    ):  # at submission the snapshot exists: the exact check, before a GPU is allocated
        check_gpu_memory(wildcards.model, [layers], estimated="raise")
    job = sp_sizing.stats_job(
        size, len(layers), tokens_of_shard(wildcards.model), stats_settings()
    )
    return {key: value * attempt for key, value in job.items()}


def snapshot_resources(wildcards, attempt):
    size = size_of(wildcards.model)
    if size is None:
        return _unknown(attempt)
    return {k: v * attempt for k, v in sp_sizing.snapshot_job(size).items()}


def corpus_resources(wildcards, attempt):
    size = size_of(wildcards.model)
    if size is None:
        return _unknown(attempt)
    total = tokens_of_shard(wildcards.model) * len(SHARDS)
    return {k: v * attempt for k, v in sp_sizing.corpus_job(size, total).items()}


def layer_resources(rule):
    def sized(wildcards, attempt):
        size = size_of(wildcards.model)
        if size is None:
            return _unknown(attempt)
        job = sp_sizing.layer_jobs(size, len(SHARDS))[rule]
        return {k: v * attempt for k, v in job.items()}

    return sized


def sized(fn, key):
    """One resource of a sizing function, as a Snakemake resource callable (wildcards, attempt)."""
    return lambda wildcards, attempt: fn(wildcards, attempt)[key]


# ---- downloads on the submit host (rules/models.smk, rules/corpus.smk) ----


def hub_download(wildcards):
    """The download record a hub model's snapshot reads (none for local and GGUF-package models)."""
    if (config["models"][wildcards.model] or {}).get("source") != "hub":
        return []
    return res(f"models/{wildcards.model}/download.json")


def corpus_download_record():
    return (
        res("corpus/download.json")
        if config["corpus"]["source"] == "hf_datasets"
        else []
    )
