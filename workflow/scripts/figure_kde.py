from superposition.jobs import model_sizes, start_job
from superposition.jobs.figures import figure_kde

cfg = start_job(snakemake)
figure_kde(
    snakemake.input.model,
    snakemake.input.kde,
    model_sizes(cfg),
    snakemake.output.png,
    snakemake.output.pdf,
    cfg["plots"]["dpi"],
)
