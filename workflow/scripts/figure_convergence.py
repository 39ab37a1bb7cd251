from superposition.jobs import model_sizes, start_job
from superposition.jobs.figures import figure_convergence

cfg = start_job(snakemake)
figure_convergence(
    snakemake.input.model,
    snakemake.input.ladder,
    model_sizes(cfg),
    snakemake.output.png,
    snakemake.output.pdf,
    cfg["plots"]["dpi"],
)
