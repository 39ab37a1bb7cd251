from superposition.jobs import start_job
from superposition.jobs.summaries import kurtosis_vs_m

cfg = start_job(snakemake)
kurtosis_vs_m(
    snakemake.input.model,
    snakemake.input.fact_keys,
    list(snakemake.input.whitening),
    snakemake.params.layers,
    cfg["summaries"]["m_values"],
    snakemake.output[0],
    cfg["convergence"]["m_resamples"],
    cfg["convergence"]["seed"],
)
