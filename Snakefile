# Knowledge superposition in language models (Hu et al., AAAI 2025): see README.md.
# This file only includes the stages and names the default target; the rules live in rules/*.smk.


include: "rules/common.smk"
include: "rules/models.smk"
include: "rules/corpus.smk"
include: "rules/stats.smk"
include: "rules/facts.smk"
include: "rules/matrices.smk"


rule all:
    input:
        all_layer_files("matrices/{model}/layer-{layer}.h5"),
        all_layer_files("matrices/{model}/layer-{layer}.top_pairs.tsv"),
        res("facts/selection.json"),
