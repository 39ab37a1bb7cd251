rule matrices:
    input:
        model=res("models/{model}/model.json"),
        fact_keys=res("keys/{model}.h5"),
        whitening=res("whitening/{model}/layer-{layer}.h5"),
        selection=res("facts/selection.json"),
    output:
        res("matrices/{model}/layer-{layer}.h5"),
    log:
        res("logs/matrices/{model}/layer-{layer}.log"),
    benchmark:
        res("benchmarks/matrices/{model}/layer-{layer}.tsv")
    conda:
        "../envs/superposition.yaml"
    threads: 1
    resources:
        mem_mb=sized(layer_resources("matrices"), "mem_mb"),
        runtime=sized(layer_resources("matrices"), "runtime"),
    params:
        **rule_params("matrices"),
    script:
        "../workflow/scripts/matrices.py"


# Tables that present the matrices, one job per model: their length is a presentation setting that never
# reruns the matrices.
rule top_pairs:
    input:
        model=res("models/{model}/model.json"),
        matrices=lambda w: matrix_files(w.model),
        selection=res("facts/selection.json"),
        fact_keys=res("keys/{model}.h5"),
        facts=facts_input(),
    output:
        report(
            res("matrices/{model}/top_pairs.tsv"),
            caption="../report/top_pairs.rst",
            category="Tables",
            labels={
                "model": "{model}",
                "table": "largest off-diagonal P, every layer",
            },
        ),
    log:
        res("logs/top_pairs/{model}.log"),
    benchmark:
        res("benchmarks/top_pairs/{model}.tsv")
    conda:
        "../envs/superposition.yaml"
    threads: 1
    resources:
        mem_mb=1000,
    params:
        **rule_params("top_pairs"),
        layers=lambda w: layers_of(w.model),
    script:
        "../workflow/scripts/top_pairs.py"
