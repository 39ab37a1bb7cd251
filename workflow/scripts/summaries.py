from superposition.jobs import start_job
from superposition.jobs.summaries import summaries

start_job(snakemake)
summaries(
    snakemake.input.model,
    list(snakemake.input.matrices),
    snakemake.params.layers,
    snakemake.input.selection,
    snakemake.output[0],
    list(snakemake.input.resampling),
)
