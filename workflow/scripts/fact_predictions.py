from superposition.jobs import facts_source, start_job
from superposition.jobs.facts import fact_predictions

cfg = start_job(snakemake, torch_threads=True)
fact_predictions(snakemake.input.model, facts_source(cfg), cfg["stats"], snakemake.output[0])
