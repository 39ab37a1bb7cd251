from superposition import pipeline

pipeline.start_job(snakemake.log[0], None)
pipeline.figure_kde(
    snakemake.input.model,
    snakemake.input.kde,
    snakemake.output.png,
    snakemake.output.pdf,
    snakemake.params.dpi,
)
