rule activation_stats:
    input:
        model=res("models/{model}/model.json"),
        shard=res("corpus/{model}/shard-{shard}.h5"),
    output:
        res("stats/{model}/shard-{shard}.block-{block}.h5"),
    log:
        res("logs/activation_stats/{model}/shard-{shard}.block-{block}.log"),
    benchmark:
        res("benchmarks/activation_stats/{model}/shard-{shard}.block-{block}.tsv")
    conda:
        "../envs/superposition.yaml"
    threads: stats_threads()
    resources:
        mem_mb=sized(stats_resources, "mem_mb"),
        runtime=sized(stats_resources, "runtime"),
    params:
        **rule_params("activation_stats"),
        layers=lambda w: sp_config.block_layers(w.block),
        checkpoint=lambda w: res(
            f"checkpoints/{w.model}/shard-{w.shard}.block-{w.block}.h5"
        ),
    script:
        "../workflow/scripts/activation_stats.py"


rule covariance:
    input:
        model=res("models/{model}/model.json"),
        manifest=res("corpus/{model}/manifest.json"),
        stats=stats_for_layer,
    output:
        res("covariance/{model}/layer-{layer}.h5"),
    log:
        res("logs/covariance/{model}/layer-{layer}.log"),
    benchmark:
        res("benchmarks/covariance/{model}/layer-{layer}.tsv")
    conda:
        "../envs/superposition.yaml"
    threads: 1
    resources:
        mem_mb=sized(layer_resources("covariance"), "mem_mb"),
        runtime=sized(layer_resources("covariance"), "runtime"),
    params:
        **rule_params("covariance"),
    script:
        "../workflow/scripts/covariance.py"


rule whitening:
    input:
        model=res("models/{model}/model.json"),
        covariance=res("covariance/{model}/layer-{layer}.h5"),
    output:
        res("whitening/{model}/layer-{layer}.h5"),
    log:
        res("logs/whitening/{model}/layer-{layer}.log"),
    benchmark:
        res("benchmarks/whitening/{model}/layer-{layer}.tsv")
    conda:
        "../envs/superposition.yaml"
    threads: 1
    resources:
        mem_mb=sized(layer_resources("whitening"), "mem_mb"),
        runtime=sized(layer_resources("whitening"), "runtime"),
    params:
        **rule_params("whitening"),
    script:
        "../workflow/scripts/whitening.py"
