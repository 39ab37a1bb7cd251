from superposition.jobs import model_sizes, start_job
from superposition.jobs.figures import figure_kurtosis_vs_m

cfg = start_job(snakemake)
figure_kurtosis_vs_m(
    snakemake.input.model,
    snakemake.input.table,
    model_sizes(cfg),
    snakemake.output.png,
    snakemake.output.pdf,
    cfg["plots"]["dpi"],
)
