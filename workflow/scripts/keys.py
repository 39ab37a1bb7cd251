from superposition.jobs import execution_of, facts_source, start_job
from superposition.jobs.keys import keys

cfg = start_job(snakemake, torch_threads=True)
keys(
    snakemake.input.model,
    snakemake.input.selection,
    snakemake.params.layers,
    facts_source(cfg),
    cfg["stats"],
    snakemake.output.fact_keys,
    snakemake.output.subjects,
    execution_of(snakemake),
)
