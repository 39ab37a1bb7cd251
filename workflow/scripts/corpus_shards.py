from superposition.jobs import start_job
from superposition.jobs.corpus import corpus_shards

cfg = start_job(snakemake)
corpus_shards(
    snakemake.input.model,
    cfg["corpus"],
    list(snakemake.output.shards),
    snakemake.output.manifest,
    snakemake.input.download[0] if snakemake.input.get("download") else None,
)
