from superposition.jobs import start_job
from superposition.jobs.snapshot import model_snapshot

cfg = start_job(snakemake)
model_snapshot(
    snakemake.wildcards.model,
    snakemake.config["models"][snakemake.wildcards.model],
    snakemake.output[0],
    cfg["cache_dir"],
    snakemake.input.download[0] if snakemake.input.get("download") else None,
)
