from superposition.jobs import model_sizes, start_job
from superposition.jobs.figures import figure_editing

cfg = start_job(snakemake)
figure_editing(
    snakemake.input.model,
    snakemake.input.steps,
    snakemake.input.facts,
    int(snakemake.wildcards.layer),
    model_sizes(cfg),
    snakemake.output.curves_png,
    snakemake.output.curves_pdf,
    snakemake.output.scatter_png,
    snakemake.output.scatter_pdf,
    snakemake.output.separation,
    cfg["plots"]["dpi"],
)
