from superposition.jobs import model_sizes, start_job
from superposition.jobs.figures import figure_heatmaps

cfg = start_job(snakemake)
figure_heatmaps(
    snakemake.input.model,
    list(snakemake.input.matrices),
    snakemake.params.layers,
    model_sizes(cfg),
    snakemake.output.png,
    snakemake.output.pdf,
    cfg["plots"]["dpi"],
)
