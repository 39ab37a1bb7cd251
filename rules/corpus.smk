# An hf_datasets corpus is downloaded on the submit host (rule corpus_download, local: cluster compute nodes often
# have no network) into the datasets cache; the tokenisation reads the prepared files offline, on a CPU node.


rule corpus_download:
    output:
        res("corpus/download.json"),
    log:
        res("logs/corpus_download.log"),
    localrule: True
    conda:
        "../envs/superposition.yaml"
    params:
        **rule_params("corpus_download"),
    script:
        "../workflow/scripts/corpus_download.py"


rule corpus_shards:
    input:
        model=res("models/{model}/model.json"),
        download=corpus_download_record(),
    output:
        shards=expand(res("corpus/{{model}}/shard-{shard}.h5"), shard=SHARDS),
        manifest=res("corpus/{model}/manifest.json"),
    log:
        res("logs/corpus_shards/{model}.log"),
    benchmark:
        res("benchmarks/corpus_shards/{model}.tsv")
    conda:
        "../envs/superposition.yaml"
    threads: 1
    resources:
        mem_mb=sized(corpus_resources, "mem_mb"),
        runtime=sized(corpus_resources, "runtime"),
    params:
        **rule_params("corpus_shards"),
    script:
        "../workflow/scripts/corpus_shards.py"
