rule corpus_shards:
    input:
        model=res("models/{model}/model.json"),
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
        mem_mb=4000,
    params:
        **rule_params("corpus_shards"),
    script:
        "../workflow/scripts/corpus_shards.py"
