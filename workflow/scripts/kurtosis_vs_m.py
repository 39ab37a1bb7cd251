from superposition import pipeline

pipeline.start_job(snakemake.log[0], snakemake.threads)
pipeline.kurtosis_vs_m(
    snakemake.input.model,
    snakemake.input.fact_keys,
    list(snakemake.input.whitening),
    snakemake.params.layers,
    snakemake.params.m_values,
    snakemake.output[0],
)
