from superposition.jobs import model_sizes, start_job
from superposition.jobs.figures import figure_kurtosis_vs_layer

cfg = start_job(snakemake)
figure_kurtosis_vs_layer(
    list(snakemake.input.models),
    list(snakemake.input.tables),
    model_sizes(cfg),
    snakemake.output.png,
    snakemake.output.pdf,
    cfg["plots"]["dpi"],
    cfg["convergence"]["confidence"],
)
