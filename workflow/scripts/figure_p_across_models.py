from superposition import pipeline

pipeline.start_job(snakemake.log[0], None)
pipeline.figure_across_models(
    list(snakemake.input.models),
    list(snakemake.input.matrices),
    snakemake.params.layers,
    snakemake.output.png,
    snakemake.output.pdf,
    snakemake.params.dpi,
)
