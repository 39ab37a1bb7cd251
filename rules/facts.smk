rule fact_predictions:
    input:
        model=res("models/{model}/model.json"),
        facts=facts_input(),
    output:
        res("facts/predictions/{model}.tsv"),
    log:
        res("logs/fact_predictions/{model}.log"),
    benchmark:
        res("benchmarks/fact_predictions/{model}.tsv")
    conda:
        "../envs/superposition.yaml"
    threads: 2
    resources:
        mem_mb=8000,
    params:
        **rule_params("fact_predictions"),
    script:
        "../workflow/scripts/fact_predictions.py"


rule known_facts:
    input:
        predictions=prediction_files,
        facts=facts_input(),
    output:
        table=res("facts/known_facts.tsv"),
        selection=res("facts/selection.json"),
    log:
        res("logs/known_facts.log"),
    benchmark:
        res("benchmarks/known_facts.tsv")
    conda:
        "../envs/superposition.yaml"
    threads: 1
    params:
        **rule_params("known_facts"),
        # the model list matters only to the known-fact filter; with explicit case_ids adding a model
        # must not rerun the selection (and so every model's keys and matrices)
        models=MODELS if USE_KNOWN_FILTER else [],
    script:
        "../workflow/scripts/known_facts.py"


rule keys:
    input:
        model=res("models/{model}/model.json"),
        selection=res("facts/selection.json"),
    output:
        fact_keys=res("keys/{model}.h5"),
        subjects=report(
            res("keys/{model}.subjects.tsv"),
            caption="../report/subjects.rst",
            category="Tables",
            labels={"model": "{model}", "table": "subject tokens and first positions"},
        ),
    log:
        res("logs/keys/{model}.log"),
    benchmark:
        res("benchmarks/keys/{model}.tsv")
    conda:
        "../envs/superposition.yaml"
    threads: 2
    resources:
        mem_mb=8000,
    params:
        **rule_params("keys"),
        layers=lambda w: every_layer_of(w.model),
    script:
        "../workflow/scripts/keys.py"
