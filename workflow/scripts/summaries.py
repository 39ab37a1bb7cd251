from superposition import pipeline

pipeline.start_job(snakemake.log[0], snakemake.threads)
pipeline.summaries(
    snakemake.input.model,
    list(snakemake.input.matrices),
    snakemake.params.layers,
    snakemake.input.selection,
    snakemake.params.kde_grid,
    snakemake.output.table,
    snakemake.output.kde,
)
