rule corpus_shards:
    input:
        model=res("models/{model}/model.json"),
    output:
        shards=expand(res("corpus/{{model}}/shard-{shard}.h5"), shard=SHARDS),
        manifest=res("corpus/{model}/manifest.json"),
    params:
        corpus=config["corpus"],
        code=CODE["corpus"],
    log:
        res("logs/corpus_shards/{model}.log"),
    benchmark:
        res("benchmarks/corpus_shards/{model}.tsv")
    threads: 1
    resources:
        mem_mb=4000,
    script:
        "../workflow/scripts/corpus_shards.py"
