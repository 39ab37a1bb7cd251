from superposition.jobs import start_job
from superposition.jobs.snapshot import model_download

start_job(snakemake)
model_download(
    snakemake.wildcards.model,
    snakemake.config["models"][snakemake.wildcards.model],
    snakemake.output[0],
)
