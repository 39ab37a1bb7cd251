from superposition.jobs import start_job
from superposition.jobs.covariance import export_rome

start_job(snakemake)
export_rome(
    snakemake.input.model,
    list(snakemake.input.covariance),
    snakemake.params.layers,
    snakemake.input.manifest or None,  # none for imported statistics
    snakemake.output.stats,
    snakemake.output.manifest,
)
