# Statistics in ROME's cache layout, for ROME/MEMIT/EasyEdit/AlphaEdit users: `snakemake rome_stats`.


rule export_rome:
    input:
        model=res("models/{model}/model.json"),
        covariance=lambda w: res(
            f"covariance/{w.model}/layer-{layer_of_module(w.module)}.h5"
        ),
        manifest=res("corpus/{model}/manifest.json"),
    output:
        res("rome_stats/{model}/wikipedia_stats/{module}_float32_mom2_{n}.npz"),
    log:
        res("logs/export_rome/{model}/{module}_{n}.log"),
    benchmark:
        res("benchmarks/export_rome/{model}/{module}_{n}.tsv")
    conda:
        "../envs/superposition.yaml"
    threads: 1
    params:
        **rule_params("export_rome"),
        layer=lambda w: layer_of_module(w.module),
    script:
        "../workflow/scripts/export_rome.py"


rule rome_stats:
    input:
        lambda w: [
            res(
                f"rome_stats/{m}/wikipedia_stats/{rome_module(m, layer)}_float32_mom2_{config['corpus']['n_documents']}.npz"
            )
            for m in MODELS
            for layer in layers_of(m)
        ],
