"""Estimated GPU hours of the activation-statistics stage of a config (run by hand; an estimate, not a measurement).

For config/paper.yaml on an H200 the README's table is scaled from measured passes instead
(benchmarks/gpu_check.py, docs/gpu_check_h200/); this script estimates other GPUs. The estimate counts
floating-point operations of our single pass and divides by an assumed sustained throughput:

    forward  = 2 * parameters * tokens                     (bfloat16 weights, stats.model_dtype)
    Gram     = 2 * layers * tokens * sum over panels of rows * (d_m - first row)
                                                            (float32 upper-triangle block rows of K^T K per batch,
                                                             1,024 rows each on a GPU, TF32 off: fp32 CUDA cores)

    hours = forward / (forward_tflops * efficiency) + Gram / (gram_tflops * efficiency)

Defaults: an A100 (312 TFLOP/s bfloat16 tensor cores, 19.5 TFLOP/s float32 without TF32), 40% sustained
(an assumption: our CPU benchmark reached 65-69% of the measured matmul peak for forward + Gram, but a GPU's
small-batch forward rarely sustains that), and 700 tokens per Wikipedia
article after truncation to the model's context (set --tokens-per-document from the corpus manifest once
corpus_shards has run: results/paper/corpus/<model>/manifest.json has corpus_tokens).

    .venv/bin/python benchmarks/gpu_hours.py --config config/paper.yaml
"""

from __future__ import annotations

import argparse

import yaml

from superposition.stats import GRAM_PANEL

def upper_panel_gram_flops(d_m: int, rows: int = GRAM_PANEL[1]) -> int:
    """FLOPs per token and layer of the batch Gram as computed on a GPU (stats.GramAccumulator)."""
    return sum(2 * min(rows, d_m - start) * (d_m - start) for start in range(0, d_m, rows))


# Width of the key (input of the down projection), from each model's published config.json.
KEY_WIDTH = {
    "gpt2": 3072, "gpt2-medium": 4096, "gpt2-large": 5120, "gpt2-xl": 6400,
    "EleutherAI/pythia-1b": 8192, "EleutherAI/pythia-2.8b": 10240, "EleutherAI/pythia-6.9b": 16384,
    "EleutherAI/gpt-j-6B": 16384, "meta-llama/Llama-2-7b-hf": 11008, "meta-llama/Llama-2-13b-hf": 13824,
    "meta-llama/Meta-Llama-3-8B": 14336, "meta-llama/Llama-3.1-8B": 14336,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="config/paper.yaml")
    parser.add_argument("--tokens-per-document", type=float, default=700.0)
    parser.add_argument("--forward-tflops", type=float, default=312.0, help="bfloat16 peak of the GPU")
    parser.add_argument("--gram-tflops", type=float, default=19.5, help="float32 peak without TF32")
    parser.add_argument("--efficiency", type=float, default=0.40)
    args = parser.parse_args()

    cfg = yaml.safe_load(open(args.config))
    tokens = cfg["corpus"]["n_documents"] * args.tokens_per_document
    print(f"tokens per model: {tokens:.3g} ({cfg['corpus']['n_documents']} documents x {args.tokens_per_document:g}); "
          f"{args.forward_tflops:g} / {args.gram_tflops:g} TFLOP/s at {args.efficiency:.0%}  [ESTIMATE]")
    print(f"| model | parameters | layers | d_m | forward PFLOP | Gram PFLOP | est. GPU hours |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    total = 0.0
    for name, entry in cfg["models"].items():
        d_m = KEY_WIDTH.get(entry.get("id", name))
        if d_m is None:
            print(f"| {name} | (unknown key width: add it to KEY_WIDTH) |")
            continue
        params = entry["params_millions"] * 1e6
        forward = 2 * params * tokens
        gram = upper_panel_gram_flops(d_m) * entry["n_layers"] * tokens
        hours = (forward / (args.forward_tflops * 1e12) + gram / (args.gram_tflops * 1e12)) / args.efficiency / 3600
        total += hours
        print(f"| {name} | {params / 1e9:.2f} B | {entry['n_layers']} | {d_m} | {forward / 1e15:.0f} | "
              f"{gram / 1e15:.0f} | {hours:.1f} |")
    print(f"| total | | | | | | {total:.0f} |")


if __name__ == "__main__":
    main()
