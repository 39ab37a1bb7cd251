rule figure_heatmaps:
    input:
        model=res("models/{model}/model.json"),
        matrices=lambda w: matrix_files(w.model),
    output:
        png=report(
            res("figures/{model}/p_heatmaps.png"),
            caption="../report/p_heatmaps.rst",
            category="Per model",
            labels={"model": "{model}", "figure": "P heatmaps, every layer"},
        ),
        pdf=res("figures/{model}/p_heatmaps.pdf"),
    log:
        res("logs/figure_heatmaps/{model}.log"),
    benchmark:
        res("benchmarks/figure_heatmaps/{model}.tsv")
    conda:
        "../envs/superposition.yaml"
    params:
        **rule_params("figure_heatmaps"),
        layers=lambda w: layers_of(w.model),
    script:
        "../workflow/scripts/figure_heatmaps.py"


rule figure_kde:
    input:
        model=res("models/{model}/model.json"),
        kde=res("summaries/{model}/kde.h5"),
    output:
        png=report(
            res("figures/{model}/p_kde.png"),
            caption="../report/p_kde.rst",
            category="Per model",
            labels={"model": "{model}", "figure": "P density, every layer"},
        ),
        pdf=res("figures/{model}/p_kde.pdf"),
    log:
        res("logs/figure_kde/{model}.log"),
    benchmark:
        res("benchmarks/figure_kde/{model}.tsv")
    conda:
        "../envs/superposition.yaml"
    params:
        **rule_params("figure_kde"),
    script:
        "../workflow/scripts/figure_kde.py"


rule figure_kurtosis_vs_m:
    input:
        model=res("models/{model}/model.json"),
        table=res("summaries/{model}/kurtosis_vs_m.tsv"),
    output:
        png=report(
            res("figures/{model}/kurtosis_vs_m.png"),
            caption="../report/kurtosis_vs_m.rst",
            category="Per model",
            labels={"model": "{model}", "figure": "kurtosis vs number of facts"},
        ),
        pdf=res("figures/{model}/kurtosis_vs_m.pdf"),
    log:
        res("logs/figure_kurtosis_vs_m/{model}.log"),
    benchmark:
        res("benchmarks/figure_kurtosis_vs_m/{model}.tsv")
    conda:
        "../envs/superposition.yaml"
    params:
        **rule_params("figure_kurtosis_vs_m"),
    script:
        "../workflow/scripts/figure_kurtosis_vs_m.py"


rule figure_p_across_models:
    input:
        models=expand(res("models/{model}/model.json"), model=MODELS),
        matrices=[res(f"matrices/{m}/layer-{first_layer(m)}.h5") for m in MODELS],
    output:
        png=report(
            figure("fig3_p_heatmaps_first_layer")["png"],
            caption="../report/fig3.rst",
            category="Paper figures",
            labels={"figure": "Fig. 3: P at layer 0 across models"},
        ),
        pdf=figure("fig3_p_heatmaps_first_layer")["pdf"],
    log:
        res("logs/figure_p_across_models.log"),
    benchmark:
        res("benchmarks/figure_p_across_models.tsv")
    conda:
        "../envs/superposition.yaml"
    params:
        **rule_params("figure_p_across_models"),
        layers=[first_layer(m) for m in MODELS],
    script:
        "../workflow/scripts/figure_p_across_models.py"


rule figure_kde_across_models:
    input:
        models=expand(res("models/{model}/model.json"), model=MODELS),
        kde=expand(res("summaries/{model}/kde.h5"), model=MODELS),
    output:
        png=report(
            figure("fig4_p_kde_first_layer")["png"],
            caption="../report/fig4.rst",
            category="Paper figures",
            labels={"figure": "Fig. 4: P density at layer 0 across models"},
        ),
        pdf=figure("fig4_p_kde_first_layer")["pdf"],
    log:
        res("logs/figure_kde_across_models.log"),
    benchmark:
        res("benchmarks/figure_kde_across_models.tsv")
    conda:
        "../envs/superposition.yaml"
    params:
        **rule_params("figure_kde_across_models"),
    script:
        "../workflow/scripts/figure_kde_across_models.py"


rule figure_kurtosis_vs_layer:
    input:
        models=expand(res("models/{model}/model.json"), model=MODELS),
        tables=expand(res("summaries/{model}/layers.tsv"), model=MODELS),
    output:
        png=report(
            figure("fig5_kurtosis_vs_layer")["png"],
            caption="../report/fig5.rst",
            category="Paper figures",
            labels={"figure": "Fig. 5: kurtosis by layer"},
        ),
        pdf=figure("fig5_kurtosis_vs_layer")["pdf"],
    log:
        res("logs/figure_kurtosis_vs_layer.log"),
    benchmark:
        res("benchmarks/figure_kurtosis_vs_layer.tsv")
    conda:
        "../envs/superposition.yaml"
    params:
        **rule_params("figure_kurtosis_vs_layer"),
    script:
        "../workflow/scripts/figure_kurtosis_vs_layer.py"


rule figure_angles:
    input:
        models=expand(res("models/{model}/model.json"), model=MODELS),
        kde=expand(res("summaries/{model}/kde.h5"), model=MODELS),
    output:
        png=report(
            figure("fig6_angles_last_layer")["png"],
            caption="../report/fig6.rst",
            category="Paper figures",
            labels={"figure": "Fig. 6: angles, whitening vs activation space"},
        ),
        pdf=figure("fig6_angles_last_layer")["pdf"],
    log:
        res("logs/figure_angles.log"),
    benchmark:
        res("benchmarks/figure_angles.tsv")
    conda:
        "../envs/superposition.yaml"
    params:
        **rule_params("figure_angles"),
    script:
        "../workflow/scripts/figure_angles.py"


rule figure_kurtosis_vs_size:
    input:
        models=expand(res("models/{model}/model.json"), model=MODELS),
        tables=expand(res("summaries/{model}/layers.tsv"), model=MODELS),
    output:
        png=report(
            figure("kurtosis_vs_size")["png"],
            caption="../report/kurtosis_vs_size.rst",
            category="Paper figures",
            labels={"figure": "Kurtosis vs model size, by family"},
        ),
        pdf=figure("kurtosis_vs_size")["pdf"],
    log:
        res("logs/figure_kurtosis_vs_size.log"),
    benchmark:
        res("benchmarks/figure_kurtosis_vs_size.tsv")
    conda:
        "../envs/superposition.yaml"
    params:
        **rule_params("figure_kurtosis_vs_size"),
    script:
        "../workflow/scripts/figure_kurtosis_vs_size.py"


rule figure_convergence:
    input:
        model=res("models/{model}/model.json"),
        ladder=res("summaries/{model}/convergence.tsv"),
    output:
        png=report(
            res("figures/{model}/convergence.png"),
            caption="../report/convergence.rst",
            category="Per model",
            labels={
                "model": "{model}",
                "figure": "convergence of the statistics with the corpus size",
            },
        ),
        pdf=res("figures/{model}/convergence.pdf"),
    log:
        res("logs/figure_convergence/{model}.log"),
    benchmark:
        res("benchmarks/figure_convergence/{model}.tsv")
    conda:
        "../envs/superposition.yaml"
    params:
        **rule_params("figure_convergence"),
    script:
        "../workflow/scripts/figure_convergence.py"
