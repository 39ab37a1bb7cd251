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
        mem_mb=2000,
    params:
        **rule_params("matrices"),
    script:
        "../workflow/scripts/matrices.py"


# A table that presents the matrices: its length is a presentation setting that never reruns them.
rule top_pairs:
    input:
        model=res("models/{model}/model.json"),
        matrices=res("matrices/{model}/layer-{layer}.h5"),
        selection=res("facts/selection.json"),
        facts=facts_input(),
    output:
        res("matrices/{model}/layer-{layer}.top_pairs.tsv"),
    log:
        res("logs/top_pairs/{model}/layer-{layer}.log"),
    benchmark:
        res("benchmarks/top_pairs/{model}/layer-{layer}.tsv")
    conda:
        "../envs/superposition.yaml"
    threads: 1
    resources:
        mem_mb=1000,
    params:
        **rule_params("top_pairs"),
    script:
        "../workflow/scripts/top_pairs.py"
