rule model_snapshot:
    output:
        res("models/{model}/model.json"),
    params:
        entry=lambda w: config["models"][w.model],
        cache_dir=config["cache_dir"],
        code=CODE["models"],
    log:
        res("logs/model_snapshot/{model}.log"),
    benchmark:
        res("benchmarks/model_snapshot/{model}.tsv")
    threads: 2
    resources:
        mem_mb=8000,
    script:
        "../workflow/scripts/model_snapshot.py"
