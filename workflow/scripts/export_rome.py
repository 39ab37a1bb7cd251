from superposition import pipeline

pipeline.start_job(snakemake.log[0], snakemake.threads)
pipeline.export_rome(
    snakemake.input.model,
    snakemake.input.covariance,
    snakemake.input.manifest,
    int(snakemake.params.layer),
    snakemake.output[0],
)
