rule summaries:
    input:
        model=res("models/{model}/model.json"),
        matrices=lambda w: matrix_files(w.model),
        selection=res("facts/selection.json"),
        resampling=resampling_files,
    output:
        report(
            res("summaries/{model}/layers.tsv"),
            caption="../report/summaries.rst",
            category="Tables",
            labels={"model": "{model}", "table": "per-layer statistics"},
        ),
    log:
        res("logs/summaries/{model}.log"),
    benchmark:
        res("benchmarks/summaries/{model}.tsv")
    conda:
        "../envs/superposition.yaml"
    threads: 1
    params:
        **rule_params("summaries"),
        layers=lambda w: layers_of(w.model),
    script:
        "../workflow/scripts/summaries.py"


# Density curves on a grid: the grid is a presentation setting that never reruns the statistics table.
rule kde:
    input:
        model=res("models/{model}/model.json"),
        matrices=lambda w: matrix_files(w.model),
        selection=res("facts/selection.json"),
    output:
        res("summaries/{model}/kde.h5"),
    log:
        res("logs/kde/{model}.log"),
    benchmark:
        res("benchmarks/kde/{model}.tsv")
    conda:
        "../envs/superposition.yaml"
    threads: 1
    params:
        **rule_params("kde"),
        layers=lambda w: layers_of(w.model),
    script:
        "../workflow/scripts/kde.py"


rule kurtosis_vs_m:
    input:
        model=res("models/{model}/model.json"),
        fact_keys=res("keys/{model}.h5"),
        whitening=lambda w: [
            res(f"whitening/{w.model}/layer-{layer}.h5")
            for layer in study_layers(w.model)
        ],
    output:
        report(
            res("summaries/{model}/kurtosis_vs_m.tsv"),
            caption="../report/kurtosis_vs_m_table.rst",
            category="Tables",
            labels={"model": "{model}", "table": "kurtosis vs m"},
        ),
    log:
        res("logs/kurtosis_vs_m/{model}.log"),
    benchmark:
        res("benchmarks/kurtosis_vs_m/{model}.tsv")
    conda:
        "../envs/superposition.yaml"
    threads: 1
    params:
        **rule_params("kurtosis_vs_m"),
        layers=lambda w: study_layers(w.model),
    script:
        "../workflow/scripts/kurtosis_vs_m.py"
