from superposition.jobs import start_job
from superposition.jobs.covariance import key_scale

cfg = start_job(snakemake, torch_threads=True)
key_scale(
    snakemake.input.model,
    snakemake.params.layers,
    cfg["stats"]["device"],
    snakemake.output[0],
)
