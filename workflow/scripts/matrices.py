from superposition import pipeline

pipeline.start_job(snakemake.log[0], snakemake.threads)
pipeline.matrices(
    snakemake.input.model,
    snakemake.input.fact_keys,
    snakemake.input.whitening,
    snakemake.input.selection,
    snakemake.params.facts,
    int(snakemake.wildcards.layer),
    snakemake.params.n_top,
    snakemake.output.h5,
    snakemake.output.top_pairs,
)
