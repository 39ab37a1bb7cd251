from superposition import pipeline

pipeline.start_job(snakemake.log[0], snakemake.threads)
pipeline.keys(
    snakemake.input.model,
    snakemake.input.selection,
    snakemake.params.layers,
    snakemake.params.facts,
    snakemake.params.stats,
    snakemake.output[0],
)
