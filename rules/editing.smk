rule lifelong_edit:
    input:
        model=res("models/{model}/model.json"),
        fact_keys=res("keys/{model}.h5"),
        whitening=res("whitening/{model}/layer-{layer}.h5"),
        covariance=res("covariance/{model}/layer-{layer}.h5"),
        selection=res("facts/selection.json"),
        facts=facts_input(),
        # MEMIT's layers' whitening (their Cholesky factors of C); empty unless memit is in editing.methods
        memit_whitening=memit_whitening,
    output:
        steps=report(
            res("editing/{model}/layer-{layer}.steps.tsv"),
            caption="../report/editing_steps.rst",
            category="Lifelong editing",
            labels={"model": "{model}", "table": "edit success and retention by step"},
        ),
        facts=report(
            res("editing/{model}/layer-{layer}.facts.tsv"),
            caption="../report/editing_facts.rst",
            category="Lifelong editing",
            labels={"model": "{model}", "table": "interference per fact"},
        ),
        h5=res("editing/{model}/layer-{layer}.h5"),
    log:
        res("logs/lifelong_edit/{model}/layer-{layer}.log"),
    benchmark:
        res("benchmarks/lifelong_edit/{model}/layer-{layer}.tsv")
    conda:
        "../envs/superposition.yaml"
    threads: 2
    resources:
        mem_mb=8000,
    params:
        **rule_params("lifelong_edit"),
    script:
        "../workflow/scripts/lifelong_edit.py"


rule figure_editing:
    input:
        model=res("models/{model}/model.json"),
        steps=res("editing/{model}/layer-{layer}.steps.tsv"),
        facts=res("editing/{model}/layer-{layer}.facts.tsv"),
    output:
        curves_png=report(
            res("figures/{model}/editing_curves.layer-{layer}.png"),
            caption="../report/editing_curves.rst",
            category="Lifelong editing",
            labels={"model": "{model}", "figure": "edit success and retention"},
        ),
        curves_pdf=res("figures/{model}/editing_curves.layer-{layer}.pdf"),
        scatter_png=report(
            res("figures/{model}/editing_interference.layer-{layer}.png"),
            caption="../report/editing_interference.rst",
            category="Lifelong editing",
            labels={
                "model": "{model}",
                "figure": "predicted interference vs forgetting",
            },
        ),
        scatter_pdf=res("figures/{model}/editing_interference.layer-{layer}.pdf"),
        separation=report(
            res("editing/{model}/layer-{layer}.separation.tsv"),
            caption="../report/editing_separation.rst",
            category="Lifelong editing",
            labels={"model": "{model}", "table": "interference vs forgetting"},
        ),
    log:
        res("logs/figure_editing/{model}/layer-{layer}.log"),
    benchmark:
        res("benchmarks/figure_editing/{model}/layer-{layer}.tsv")
    conda:
        "../envs/superposition.yaml"
    params:
        **rule_params("figure_editing"),
    script:
        "../workflow/scripts/figure_editing.py"
