# Statistics in ROME's cache layout, for ROME/MEMIT/EasyEdit/AlphaEdit users: `snakemake rome_stats`.
# One job per model: the file names carry the sample size actually used (the corpus manifest's document count, or
# for imported statistics the one their files declare), and a manifest beside the files holds each file's sha256 and
# the provenance.


rule export_rome:
    input:
        model=res("models/{model}/model.json"),
        covariance=lambda w: [
            res(f"covariance/{w.model}/layer-{layer}.h5")
            for layer in layers_of(w.model)
        ],
        manifest=corpus_manifest_of,
    output:
        stats=directory(res("rome_stats/{model}/wikipedia_stats")),
        manifest=res("rome_stats/{model}/manifest.json"),
    log:
        res("logs/export_rome/{model}.log"),
    benchmark:
        res("benchmarks/export_rome/{model}.tsv")
    conda:
        "../envs/superposition.yaml"
    threads: 1
    params:
        **rule_params("export_rome"),
        layers=lambda w: layers_of(w.model),
    script:
        "../workflow/scripts/export_rome.py"


rule rome_stats:
    input:
        expand(res("rome_stats/{model}/manifest.json"), model=MODELS),
