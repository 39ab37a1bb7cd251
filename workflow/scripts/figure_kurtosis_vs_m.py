from superposition import pipeline

pipeline.start_job(snakemake.log[0], None)
pipeline.figure_kurtosis_vs_m(
    snakemake.input.model,
    snakemake.input.table,
    snakemake.output.png,
    snakemake.output.pdf,
    snakemake.params.dpi,
)
