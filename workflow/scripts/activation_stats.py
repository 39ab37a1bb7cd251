from superposition import pipeline

pipeline.start_job(snakemake.log[0], snakemake.threads)
pipeline.activation_stats(
    snakemake.input.model,
    snakemake.input.shard,
    snakemake.params.layers,
    snakemake.params.stats,
    snakemake.output[0],
    snakemake.params.checkpoint,
)
