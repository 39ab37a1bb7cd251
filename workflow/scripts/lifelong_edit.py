from superposition import pipeline

pipeline.start_job(snakemake.log[0], snakemake.threads)
pipeline.lifelong_edit(
    snakemake.input.model,
    snakemake.input.fact_keys,
    snakemake.input.whitening,
    snakemake.input.covariance,
    snakemake.input.selection,
    snakemake.params.facts,
    snakemake.params.stats,
    snakemake.params.editing,
    int(snakemake.params.layer),
    snakemake.output.steps,
    snakemake.output.facts,
    snakemake.output.h5,
)
