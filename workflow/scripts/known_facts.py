from superposition.jobs import facts_source, start_job
from superposition.jobs.facts import known_facts

cfg = start_job(snakemake)
known_facts(
    snakemake.params.models,
    list(snakemake.input.predictions),
    facts_source(cfg),
    snakemake.output.table,
    snakemake.output.selection,
)
