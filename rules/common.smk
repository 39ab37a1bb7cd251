# Config validation and the helpers that turn the config into file lists. No rules here.

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version, validate

from superposition import config as sp_config
from superposition.provenance import module_hash, rule_code_hash

min_version("9.0")


# A --configfile that names its own models is a complete config (e.g. config/paper.yaml); otherwise the
# embedded default is the base that --config/--configfile values extend.
if "models" not in config:

    configfile: "config/config.yaml"


validate(config, "../workflow/schemas/config.schema.yaml")
try:
    sp_config.validate(config)
except (sp_config.ConfigError, ValueError, IndexError) as err:
    raise WorkflowError(f"config error: {err}")

RESULTS = config["results"]
MODELS = list(config["models"])
SHARDS = list(range(config["corpus"]["n_shards"]))
USE_KNOWN_FILTER = not config["facts"].get("case_ids")

# Snakemake does not see the library code a script imports: each rule passes a hash of its pipeline
# function and the modules it uses as a param, so editing one reruns exactly the rules that depend on it.
CODE = {
    "models": rule_code_hash("model_snapshot", "superposition.models"),
    "corpus": rule_code_hash("corpus_shards", "superposition.corpus"),
    "stats": rule_code_hash(
        "activation_stats", "superposition.stats", "superposition.models"
    ),
    "merge": rule_code_hash("covariance", "superposition.stats"),
    "export": rule_code_hash("export_rome", "superposition.stats"),
    "whitening": rule_code_hash("whitening", "superposition.whitening"),
    "predictions": rule_code_hash(
        "fact_predictions", "superposition.facts", "superposition.keys"
    ),
    "known": rule_code_hash("known_facts", "superposition.facts"),
    "keys": rule_code_hash("keys", "superposition.facts", "superposition.keys"),
    "matrices": rule_code_hash("matrices", "superposition.matrices"),
    "summaries": rule_code_hash(
        "summaries", "superposition.summaries", "superposition.matrices"
    ),
    "kurtosis_vs_m": rule_code_hash("kurtosis_vs_m", "superposition.summaries"),
    "editing": rule_code_hash(
        "lifelong_edit", "superposition.editing", "superposition.keys"
    ),
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


def blocks_of(model):
    return sp_config.layer_blocks(config, model)


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


def study_layers(model):
    from superposition.pipeline import study_layers as pick

    return pick(layers_of(model))


def first_layer(model):
    return layers_of(model)[0]


def figure(name):
    """PNG (for the report) and PDF (for papers) of one figure."""
    return {"png": res(f"figures/{name}.png"), "pdf": res(f"figures/{name}.pdf")}


def layer_of_module(module):
    """Layer index in a module path such as model.layers.12.mlp.down_proj."""
    import re

    found = re.search(r"\.(\d+)\.", module)
    if not found:
        raise WorkflowError(f"cannot read a layer index from module name {module!r}")
    return int(found.group(1))


def rome_module(model, layer):
    """ROME's module name of a layer's down projection (family known from the config's model type)."""
    from superposition.models import family_for

    import json
    from pathlib import Path

    model_type = config["models"][model].get("model_type")
    manifest = Path(res(f"models/{model}/model.json"))
    if model_type is None and manifest.is_file():
        model_type = json.loads(manifest.read_text())["model_type"]
    if model_type is None:
        raise WorkflowError(
            f"the ROME file name of {model} needs its model type: run `snakemake {manifest}` "
            f"first or set models.{model}.model_type"
        )
    return family_for(model_type).module_name(layer)


def editing_models():
    """Models the lifelong-editing simulation runs on (editing.models; all models by default)."""
    if not config["editing"].get("enabled", True):
        return []
    return config["editing"].get("models") or MODELS


def edit_layer_of(model):
    return sp_config.edit_layer(config, model)


def editing_figures():
    return [
        res(f"figures/{m}/{kind}.layer-{edit_layer_of(m)}.png")
        for m in editing_models()
        for kind in ("editing_curves", "editing_interference")
    ]
