from superposition import pipeline

pipeline.start_job(snakemake.log[0], snakemake.threads)
pipeline.covariance(
    snakemake.input.model,
    snakemake.input.manifest,
    list(snakemake.input.stats),
    int(snakemake.wildcards.layer),
    snakemake.output[0],
)
