# Knowledge superposition in language models (Hu et al., AAAI 2025): see README.md.
# This file only includes the stages and names the default target; the rules live in rules/*.smk.


include: "rules/common.smk"
include: "rules/models.smk"
include: "rules/corpus.smk"
include: "rules/stats.smk"
include: "rules/facts.smk"
include: "rules/matrices.smk"
include: "rules/summaries.smk"
include: "rules/resampling.smk"
include: "rules/figures.smk"
include: "rules/export.smk"
include: "rules/editing.smk"


report: "report/workflow.rst"


rule all:
    input:
        expand(res("matrices/{model}/top_pairs.tsv"), model=MODELS),
        expand(res("summaries/{model}/layers.tsv"), model=MODELS),
        expand(res("summaries/{model}/verdict.tsv"), model=computed_models()),
        expand(res("figures/{model}/convergence.png"), model=computed_models()),
        expand(res("figures/{model}/p_heatmaps.png"), model=MODELS),
        expand(res("figures/{model}/p_kde.png"), model=MODELS),
        expand(res("figures/{model}/kurtosis_vs_m.png"), model=MODELS),
        figure("fig3_p_heatmaps_first_layer")["png"],
        figure("fig4_p_kde_first_layer")["png"],
        figure("fig5_kurtosis_vs_layer")["png"],
        figure("fig6_angles_last_layer")["png"],
        figure("kurtosis_vs_size")["png"],
        editing_figures(),
