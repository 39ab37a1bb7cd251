from superposition.jobs import start_job
from superposition.jobs.summaries import kde

cfg = start_job(snakemake)
kde(
    snakemake.input.model,
    list(snakemake.input.matrices),
    snakemake.params.layers,
    snakemake.input.selection,
    cfg["summaries"]["kde_grid"],
    snakemake.output[0],
)
