rule model_snapshot:
    output:
        res("models/{model}/model.json"),
    log:
        res("logs/model_snapshot/{model}.log"),
    benchmark:
        res("benchmarks/model_snapshot/{model}.tsv")
    conda:
        "../envs/superposition.yaml"
    threads: 2
    resources:
        mem_mb=8000,
    params:
        **rule_params("model_snapshot"),
    script:
        "../workflow/scripts/model_snapshot.py"
