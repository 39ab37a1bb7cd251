from superposition.jobs import start_job
from superposition.jobs.corpus import corpus_download

cfg = start_job(snakemake)
corpus_download(cfg["corpus"], snakemake.output[0])
