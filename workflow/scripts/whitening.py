from superposition.jobs import start_job
from superposition.jobs.whitening import whitening

cfg = start_job(snakemake)
whitening(
    snakemake.input.model,
    snakemake.input.covariance,
    int(snakemake.wildcards.layer),
    cfg["whitening"]["ridge"],
    snakemake.output[0],
)
