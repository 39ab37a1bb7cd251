from superposition import pipeline

pipeline.start_job(snakemake.log[0], snakemake.threads)
pipeline.known_facts(
    snakemake.params.models,
    list(snakemake.input.predictions),
    snakemake.params.facts,
    snakemake.output.table,
    snakemake.output.selection,
)
