rule summaries:
    input:
        model=res("models/{model}/model.json"),
        matrices=lambda w: matrix_files(w.model),
        selection=res("facts/selection.json"),
    output:
        table=report(
            res("summaries/{model}/layers.tsv"),
            caption="../report/summaries.rst",
            category="Tables",
            labels={"model": "{model}", "table": "per-layer statistics"},
        ),
        kde=res("summaries/{model}/kde.h5"),
    log:
        res("logs/summaries/{model}.log"),
    benchmark:
        res("benchmarks/summaries/{model}.tsv")
    conda:
        "../envs/superposition.yaml"
    threads: 1
    params:
        layers=lambda w: layers_of(w.model),
        kde_grid=config["summaries"]["kde_grid"],
        code=CODE["summaries"],
    script:
        "../workflow/scripts/summaries.py"


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
        layers=lambda w: study_layers(w.model),
        m_values=config["summaries"]["m_values"],
        code=CODE["kurtosis_vs_m"],
    script:
        "../workflow/scripts/kurtosis_vs_m.py"
