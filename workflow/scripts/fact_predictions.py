from superposition import pipeline

pipeline.start_job(snakemake.log[0], snakemake.threads)
pipeline.fact_predictions(
    snakemake.input.model,
    snakemake.params.facts,
    snakemake.params.stats,
    snakemake.output[0],
)
