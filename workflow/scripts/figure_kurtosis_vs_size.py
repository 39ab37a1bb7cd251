from superposition import pipeline

pipeline.start_job(snakemake.log[0], None)
pipeline.figure_kurtosis_vs_size(
    list(snakemake.input.models),
    list(snakemake.input.tables),
    snakemake.output.png,
    snakemake.output.pdf,
    snakemake.params.dpi,
)
