from superposition.jobs import facts_source, start_job
from superposition.jobs.editing import lifelong_edit

cfg = start_job(snakemake, torch_threads=True)
lifelong_edit(
    snakemake.input.model,
    snakemake.input.fact_keys,
    snakemake.input.whitening,
    snakemake.input.covariance,
    snakemake.input.selection,
    facts_source(cfg),
    cfg["stats"],
    cfg["editing"],
    int(snakemake.wildcards.layer),
    snakemake.output.steps,
    snakemake.output.facts,
    snakemake.output.h5,
    list(snakemake.input.memit_whitening),
)
