# Hub models are downloaded on the submit host (the one machine sure to reach the network: cluster compute
# nodes often cannot), into the Hugging Face cache; the snapshot (GGUF conversion, manifest) reads it offline and
# runs anywhere, on a CPU.


rule model_download:
    output:
        res("models/{model}/download.json"),
    log:
        res("logs/model_download/{model}.log"),
    localrule: True
    conda:
        "../envs/superposition.yaml"
    params:
        **rule_params("model_download"),
    script:
        "../workflow/scripts/model_download.py"


rule model_snapshot:
    input:
        download=hub_download,
    output:
        res("models/{model}/model.json"),
    log:
        res("logs/model_snapshot/{model}.log"),
    benchmark:
        res("benchmarks/model_snapshot/{model}.tsv")
    conda:
        "../envs/superposition.yaml"
    # one thread: the GGUF dequantisation is single-threaded numpy (Gemma-3: 30.6 s on 1 thread, 31.7 s on 2, the
    # same bytes), so the models' snapshots run side by side
    threads: 1
    resources:
        mem_mb=sized(snapshot_resources, "mem_mb"),
        runtime=sized(snapshot_resources, "runtime"),
    params:
        **rule_params("model_snapshot"),
    script:
        "../workflow/scripts/model_snapshot.py"
