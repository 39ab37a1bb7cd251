# How sure each number is (superposition.resampling): per layer, the convergence ladder of C and the delete-one-block
# jackknife from the statistics' segment sums (no forward pass); per model, the ladder table and the verdict.


rule resampling:
    input:
        model=res("models/{model}/model.json"),
        manifest=res("corpus/{model}/manifest.json"),
        stats=stats_for_layer,
        fact_keys=res("keys/{model}.h5"),
        whitening=res("whitening/{model}/layer-{layer}.h5"),
        selection=res("facts/selection.json"),
    output:
        res("resampling/{model}/layer-{layer}.h5"),
    log:
        res("logs/resampling/{model}/layer-{layer}.log"),
    benchmark:
        res("benchmarks/resampling/{model}/layer-{layer}.tsv")
    conda:
        "../envs/superposition.yaml"
    threads: 1
    resources:
        mem_mb=sized(layer_resources("resampling"), "mem_mb"),
        runtime=sized(layer_resources("resampling"), "runtime"),
    params:
        **rule_params("resampling"),
    script:
        "../workflow/scripts/resampling.py"


rule convergence:
    input:
        model=res("models/{model}/model.json"),
        resampling=resampling_files,
        selection=res("facts/selection.json"),
    output:
        ladder=report(
            res("summaries/{model}/convergence.tsv"),
            caption="../report/convergence_table.rst",
            category="Tables",
            labels={"model": "{model}", "table": "convergence ladder"},
        ),
        verdict=report(
            res("summaries/{model}/verdict.tsv"),
            caption="../report/verdict.rst",
            category="Tables",
            labels={"model": "{model}", "table": "convergence verdict"},
        ),
    log:
        res("logs/convergence/{model}.log"),
    benchmark:
        res("benchmarks/convergence/{model}.tsv")
    conda:
        "../envs/superposition.yaml"
    threads: 1
    params:
        **rule_params("convergence"),
        layers=lambda w: layers_of(w.model),
    script:
        "../workflow/scripts/convergence.py"
