from superposition.jobs import start_job
from superposition.jobs.covariance import covariance

start_job(snakemake)
covariance(
    snakemake.input.model,
    snakemake.input.manifest,
    list(snakemake.input.stats),
    int(snakemake.wildcards.layer),
    snakemake.output[0],
)
