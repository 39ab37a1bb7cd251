from superposition.jobs import facts_source, start_job
from superposition.jobs.top_pairs import top_pairs

cfg = start_job(snakemake)
top_pairs(
    snakemake.input.model,
    list(snakemake.input.matrices),
    snakemake.params.layers,
    snakemake.input.selection,
    snakemake.input.fact_keys,
    facts_source(cfg),
    cfg["matrices"]["top_pairs"],
    snakemake.output[0],
)
