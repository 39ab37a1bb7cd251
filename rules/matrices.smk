rule matrices:
    input:
        model=res("models/{model}/model.json"),
        fact_keys=res("keys/{model}.h5"),
        whitening=res("whitening/{model}/layer-{layer}.h5"),
        selection=res("facts/selection.json"),
    output:
        h5=res("matrices/{model}/layer-{layer}.h5"),
        top_pairs=res("matrices/{model}/layer-{layer}.top_pairs.tsv"),
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
        facts=config["facts"],
        n_top=config["matrices"]["top_pairs"],
        code=CODE["matrices"],
    script:
        "../workflow/scripts/matrices.py"
