from superposition.jobs import execution_of, start_job
from superposition.jobs.stats import activation_stats

cfg = start_job(snakemake, torch_threads=True)
activation_stats(
    snakemake.input.model,
    snakemake.input.shard,
    snakemake.params.layers,
    cfg["stats"],
    snakemake.output[0],
    snakemake.params.checkpoint,
    execution_of(snakemake),
)
