from superposition import pipeline

pipeline.start_job(snakemake.log[0], snakemake.threads)
pipeline.figure_editing(
    snakemake.input.model,
    snakemake.input.steps,
    snakemake.input.facts,
    int(snakemake.params.layer),
    snakemake.output.curves_png,
    snakemake.output.curves_pdf,
    snakemake.output.scatter_png,
    snakemake.output.scatter_pdf,
    snakemake.output.separation,
    snakemake.params.dpi,
)
