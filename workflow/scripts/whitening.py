from superposition import pipeline

pipeline.start_job(snakemake.log[0], snakemake.threads)
pipeline.whitening(
    snakemake.input.model,
    snakemake.input.covariance,
    int(snakemake.wildcards.layer),
    float(snakemake.params.ridge),
    snakemake.output[0],
)
