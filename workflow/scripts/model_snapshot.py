from superposition import pipeline

pipeline.start_job(snakemake.log[0], snakemake.threads)
pipeline.model_snapshot(
    snakemake.wildcards.model,
    snakemake.params.entry,
    snakemake.output[0],
    snakemake.params.cache_dir,
)
