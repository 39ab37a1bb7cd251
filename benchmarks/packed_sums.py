"""Packing and unpacking the float64 sums of k k^T, as the statistics, covariance and resampling jobs do, against the
fancy-indexed reference through numpy.triu_indices (the code before), in one run (run by hand; not a test).

For each width it checks that both give the same bytes, then times each the best of ``--repeats`` (one thread
unless OMP_NUM_THREADS says otherwise), and a statistics checkpoint of ``--layers`` layers written square (before)
and packed (now) with the pipeline's write_h5:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/packed_sums.py
"""

from __future__ import annotations

import argparse
import os
import tempfile
import timeit
from pathlib import Path

import numpy as np

from superposition.provenance import write_h5
from superposition.stats import pack_upper, unpack_upper


def reference_pack(S: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(S[np.triu_indices(S.shape[0])])


def reference_unpack(packed: np.ndarray, d: int) -> np.ndarray:
    S = np.zeros((d, d), dtype=packed.dtype)
    rows, cols = np.triu_indices(d)
    S[rows, cols] = packed
    S[cols, rows] = packed
    return S


def best(fn, repeats: int) -> float:
    """The fastest of ``repeats`` single runs, in seconds."""
    return min(timeit.repeat(fn, number=1, repeat=repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="*", default=[1536, 2048], help="d_m (SmolLM2, Gemma-3-270M)")
    parser.add_argument("--repeats", type=int, default=7, help="timings per variant; the best is kept")
    parser.add_argument("--layers", type=int, default=18, help="layers in the checkpoint (Gemma-3-270M: 18)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    for d in args.widths:
        S = rng.standard_normal((d, d))
        S = S + S.T
        packed = pack_upper(S)
        assert packed.tobytes() == reference_pack(S).tobytes()
        assert unpack_upper(packed, d).tobytes() == reference_unpack(packed, d).tobytes() == S.tobytes()
        pack_ref, pack_now = best(lambda: reference_pack(S), args.repeats), best(lambda: pack_upper(S), args.repeats)
        unpack_ref = best(lambda: reference_unpack(packed, d), args.repeats)
        unpack_now = best(lambda: unpack_upper(packed, d), args.repeats)
        print(f"d = {d}: pack {pack_ref * 1e3:.1f} -> {pack_now * 1e3:.1f} ms ({pack_ref / pack_now:.1f}x), "
              f"unpack {unpack_ref * 1e3:.1f} -> {unpack_now * 1e3:.1f} ms ({unpack_ref / unpack_now:.1f}x); "
              f"same bytes")
    d = args.widths[-1]
    S = rng.standard_normal((d, d))
    with tempfile.TemporaryDirectory() as tmp:
        square, tri = Path(tmp) / "square.h5", Path(tmp) / "packed.h5"
        t_square = best(lambda: write_h5(square, {f"layer_{i}/partial": S for i in range(args.layers)}, {}), 3)
        t_packed = best(lambda: write_h5(tri, {f"layer_{i}/partial": pack_upper(S) for i in range(args.layers)}, {}),
                        3)
        print(f"checkpoint of {args.layers} layers at d = {d}: square {square.stat().st_size / 1e6:.0f} MB "
              f"{t_square:.2f} s -> packed {tri.stat().st_size / 1e6:.0f} MB {t_packed:.2f} s "
              f"({t_square / t_packed:.1f}x)")


if __name__ == "__main__":
    main()
