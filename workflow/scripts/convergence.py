from superposition.jobs import start_job
from superposition.jobs.resampling import convergence

cfg = start_job(snakemake)
convergence(
    snakemake.input.model,
    list(snakemake.input.resampling),
    snakemake.params.layers,
    snakemake.input.selection,
    cfg["convergence"]["tolerance"],
    snakemake.output.ladder,
    snakemake.output.verdict,
)
