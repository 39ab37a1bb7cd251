from superposition import pipeline

pipeline.start_job(snakemake.log[0], snakemake.threads)
pipeline.corpus_shards(
    snakemake.input.model,
    snakemake.params.corpus,
    list(snakemake.output.shards),
    snakemake.output.manifest,
)
