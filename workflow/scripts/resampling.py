from superposition.jobs import start_job
from superposition.jobs.resampling import resampling

cfg = start_job(snakemake)
resampling(
    snakemake.input.model,
    snakemake.input.manifest,
    list(snakemake.input.stats),
    snakemake.input.fact_keys,
    snakemake.input.whitening,
    snakemake.input.selection,
    int(snakemake.wildcards.layer),
    cfg["whitening"]["ridge"],
    cfg["convergence"],
    snakemake.output[0],
)
