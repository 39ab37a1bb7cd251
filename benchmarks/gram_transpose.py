"""Laying out a layer's pending keys as the contiguous keys^T its Gram products read: the statistics' tiled copy
(``stats.LayerGram._transposed``) against torch.cat of the transposed chunks (the code before), in one run (run by
hand; not a test). Checks that both give the same bytes, then prints the best of ``--repeats`` and the ratio:

    .venv/bin/python benchmarks/gram_transpose.py
"""

from __future__ import annotations

import argparse
import timeit

import torch

from superposition.stats import TRANSPOSE_ROWS, LayerGram


def best(fn, repeats: int) -> float:
    """The fastest of ``repeats`` single runs, in seconds."""
    return min(timeit.repeat(fn, number=1, repeat=repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-m", type=int, nargs="+", default=[1536, 2048], help="key widths (SmolLM2, Gemma)")
    parser.add_argument("--chunks", type=int, nargs="+", default=[700, 650, 698],
                        help="tokens of each forward batch's keys (stats.gram_tokens = 2,048 on the CPU)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the statistics jobs take all cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    for d_m in args.d_m:
        chunks = [torch.randn(n, d_m, generator=generator) for n in args.chunks]
        gram = LayerGram(d_m, torch.device("cpu"), panel_rows=256, transpose_rows=TRANSPOSE_ROWS[0])
        tiled = gram._transposed(chunks)
        before = torch.cat([c.T for c in chunks], dim=1)
        if not torch.equal(tiled, before):
            raise SystemExit(f"d_m {d_m}: the tiled copy differs from torch.cat")
        t_before = best(lambda: torch.cat([c.T for c in chunks], dim=1), args.repeats)
        t_tiled = best(lambda: gram._transposed(chunks), args.repeats)
        print(f"d_m {d_m}, {sum(args.chunks)} keys in {len(chunks)} chunks, {args.threads} threads: torch.cat of the "
              f"transposed chunks {1e3 * t_before:.1f} ms, tiled {1e3 * t_tiled:.1f} ms, {t_before / t_tiled:.1f}x "
              f"(the same bytes)")


if __name__ == "__main__":
    main()
