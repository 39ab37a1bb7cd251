from superposition.jobs import start_job
from superposition.jobs.covariance import covariance, imported_covariance

cfg = start_job(snakemake)
if hasattr(snakemake.input, "source"):  # models.<name>.statistics: imported, no corpus
    imported_covariance(
        snakemake.input.model,
        snakemake.input.source,
        snakemake.input.key_scale,
        int(snakemake.wildcards.layer),
        cfg["models"][snakemake.wildcards.model]["statistics"],
        snakemake.output[0],
    )
else:
    covariance(
        snakemake.input.model,
        snakemake.input.manifest,
        list(snakemake.input.stats),
        int(snakemake.wildcards.layer),
        snakemake.output[0],
    )
