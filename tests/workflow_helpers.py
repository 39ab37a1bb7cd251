"""Helpers of the workflow tests: Snakemake in a subprocess, the dry-run job table, the tiny model and config."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def snakemake(*args, cwd=REPO, check=True, env=None):
    proc = subprocess.run([*SNAKEMAKE, *args], cwd=cwd, capture_output=True, text=True, timeout=900, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def job_counts(output: str) -> dict[str, int]:
    """Parse the 'Job stats' table of a dry run."""
    counts = {}
    if "Job stats:" not in output:  # "Nothing to be done"
        return counts
    block = output.split("Job stats:")[1].split("total")[0]
    for line in block.splitlines():
        m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if m:
            counts[m.group(1)] = int(m.group(2))
    return counts


def write_config(tmp_path, **overrides):
    cfg = yaml.safe_load((REPO / "config/config.yaml").read_text())
    cfg["results"] = str(tmp_path / "results")
    cfg["cache_dir"] = str(tmp_path / "cache")
    for key, value in overrides.items():
        cfg[key] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def make_tiny_model(tmp: Path, tokenizer_path: str) -> None:
    """A tiny random Llama with SmolLM2's tokenizer in tmp/tiny and five facts in tmp/facts.json (once)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (tmp / "tiny").is_dir():
        return
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    LlamaForCausalLM(config).save_pretrained(tmp / "tiny")
    tokenizer.save_pretrained(tmp / "tiny")
    facts = [{"case_id": i, "requested_rewrite": {"prompt": p, "subject": s, "relation_id": "P", "target_true": {"str": t}}}
             for i, (p, s, t) in enumerate([("The capital of {} is", "France", "Paris"),
                                            ("{} is located in", "France", "Europe"),
                                            ("{} was developed by", "Windows 8.1", "Microsoft"),
                                            ("{} was developed by", "Mac OS X 10.1", "Apple"),
                                            ("The capital of {} is", "Japan", "Tokyo")])]
    (tmp / "facts.json").write_text(json.dumps(facts))


def tiny_settings(tmp: Path) -> dict:
    """Config sections of a small but complete run on the tiny model of ``make_tiny_model``."""
    return dict(
        models={"tiny": {"source": "local", "path": str(tmp / "tiny"), "n_layers": 3, "params_millions": 1.6}},
        corpus={"source": "wiki_offline", "n_documents": 24, "max_length": 48, "n_shards": 2},
        facts={"source": "file", "path": str(tmp / "facts.json"), "m": 4, "case_ids": [4, 0, 1, 2, 3]},
        stats={"checkpoint_every": 2, "max_tokens_per_batch": 256},
    )


# ROME's boxed None (util/runningstats.py null_numpy_value: the NaN with the bits 0xfff8000000000002)
ROME_NULL = numpy.array(0xFFF8000000000002, dtype=numpy.uint64).view(numpy.float64)


def write_rome_stats(folder: Path, module_name: str, total, count: int, *, precision: str = "float32",
                     sample_size: int | None = 100000) -> Path:
    """A statistics file exactly as ROME's layer_stats caches it, written from their documented format (not with
    our exporter): tally() saves CombinedStat(mom2=SecondMoment()).state_dict() plus its args ({"sample_size": ...})
    with numpy.savez(cachefile, **box_numpy_null(dat)); SecondMoment.state_dict() is {"constructor":
    "util.runningstats.SecondMoment()", "count": self.count, "mom2": self.mom2 (the sum of a^T a)}, and CombinedStat
    prefixes each key with "mom2.". The name is f"{layer_name}_{precision}_mom2{size_suffix}.npz"."""
    dat = {"mom2.constructor": "util.runningstats.SecondMoment()", "mom2.count": count,
           "mom2.mom2": numpy.asarray(total).astype(precision), "sample_size": sample_size}
    boxed = {k: (ROME_NULL if v is None else v) for k, v in dat.items()}
    folder.mkdir(parents=True, exist_ok=True)
    suffix = "" if sample_size is None else f"_{sample_size}"
    path = folder / f"{module_name}_{precision}_mom2{suffix}.npz"
    numpy.savez(path, **boxed)
    return path
