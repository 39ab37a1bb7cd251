from superposition.jobs import model_sizes, start_job
from superposition.jobs.figures import figure_across_models

cfg = start_job(snakemake)
figure_across_models(
    list(snakemake.input.models),
    list(snakemake.input.matrices),
    snakemake.params.layers,
    model_sizes(cfg),
    snakemake.output.png,
    snakemake.output.pdf,
    cfg["plots"]["dpi"],
)
