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


# One rule for computed and imported statistics (covariance_inputs): the shards' sums, or the layer's imported file.
rule covariance:
    input:
        unpack(covariance_inputs),
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


# Imported statistics only: ||k||^2 over a fixed probe text, the scale their sum-vs-mean check compares with.
rule key_scale:
    input:
        model=res("models/{model}/model.json"),
    output:
        res("imports/{model}/key_scale.json"),
    log:
        res("logs/key_scale/{model}.log"),
    benchmark:
        res("benchmarks/key_scale/{model}.tsv")
    conda:
        "../envs/superposition.yaml"
    threads: stats_threads()
    resources:
        mem_mb=16000,
    params:
        **rule_params("key_scale"),
        layers=lambda w: layers_of(w.model),
    script:
        "../workflow/scripts/key_scale.py"


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
