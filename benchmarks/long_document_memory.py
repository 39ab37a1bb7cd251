"""Peak host memory of the statistics stage for one long document on the CPU (run by hand; not a test).

Each measurement runs in its own process: load the model, note the resident memory, then collect the second
moments of every requested layer over one document of --length random token ids (longer than
--max-tokens, so it is a batch of its own) and report the peak resident memory (``resource.getrusage``
``ru_maxrss``) above the loaded model, with the attention implementation the model ran.

    .venv/bin/python benchmarks/long_document_memory.py --model results/models/smollm2-135m/model.json \
        --length 8192 --attention sdpa eager
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure(args) -> dict:
    import numpy as np
    import torch

    from superposition import models, stats

    torch.set_num_threads(args.threads)
    length, attention = args.length[0], args.attention[0]
    manifest = models.read_manifest(args.model)
    model, tokenizer = models.load(manifest, "cpu", "float32")
    model.set_attn_implementation(attention)
    layers = list(range(manifest["n_layers"])) if args.layers is None else args.layers
    doc = np.random.default_rng(0).integers(3, len(tokenizer) - 1, size=length, dtype=np.int32)
    loaded = rss_mb()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        summary = stats.collect_second_moments(model, [doc], layers, f"{tmp}/s.h5", {"model": manifest["name"]},
                                               pad_id=tokenizer.pad_token_id, progress=False,
                                               options=stats.StatsOptions.from_config(max_tokens=args.max_tokens))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"length": length, "attention": model.config._attn_implementation, "layers": len(layers),
            "max_tokens": args.max_tokens, "n_batches": summary["n_batches"], "n_tokens": summary["n_tokens"],
            "loaded_mb": round(loaded), "peak_mb": round(peak), "above_loaded_mb": round(peak - loaded),
            "seconds": round(time.perf_counter() - t0, 1), "threads": args.threads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a snapshot manifest (model.json)")
    parser.add_argument("--length", type=int, nargs="+", default=[8192])
    parser.add_argument("--attention", nargs="+", default=["sdpa"], help="attention implementations to compare")
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="default: every layer")
    parser.add_argument("--max-tokens", type=int, default=4096, help="stats.max_tokens_per_batch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # the measuring child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args)))
        return
    for length in args.length:
        for attention in args.attention:
            cmd = [sys.executable, __file__, "--one", "--model", args.model, "--length", str(length), "--attention",
                   attention, "--max-tokens", str(args.max_tokens), "--threads", str(args.threads)]
            if args.layers is not None:
                cmd += ["--layers", *map(str, args.layers)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            lines = done.stdout.strip().splitlines()
            print(lines[-1] if done.returncode == 0 and lines else
                  f"length {length} {attention}: exit {done.returncode}: {done.stderr.strip()[-400:]}", flush=True)


if __name__ == "__main__":
    main()
