from superposition import pipeline

pipeline.start_job(snakemake.log[0], None)
pipeline.figure_kde_across_models(
    list(snakemake.input.models),
    list(snakemake.input.kde),
    snakemake.output.png,
    snakemake.output.pdf,
    snakemake.params.dpi,
)
