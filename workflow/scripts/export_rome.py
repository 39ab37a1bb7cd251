from superposition.jobs import start_job
from superposition.jobs.covariance import export_rome

start_job(snakemake)
export_rome(
    snakemake.input.model,
    snakemake.input.covariance,
    snakemake.input.manifest,
    snakemake.params.layer,
    snakemake.output[0],
)
