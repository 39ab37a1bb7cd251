from superposition.jobs import start_job
from superposition.jobs.matrices import matrices

start_job(snakemake)
matrices(
    snakemake.input.model,
    snakemake.input.fact_keys,
    snakemake.input.whitening,
    snakemake.input.selection,
    int(snakemake.wildcards.layer),
    snakemake.output[0],
)
