from superposition.jobs import facts_source, start_job
from superposition.jobs.matrices import top_pairs

cfg = start_job(snakemake)
top_pairs(
    snakemake.input.model,
    snakemake.input.matrices,
    snakemake.input.selection,
    facts_source(cfg),
    int(snakemake.wildcards.layer),
    cfg["matrices"]["top_pairs"],
    snakemake.output[0],
)
