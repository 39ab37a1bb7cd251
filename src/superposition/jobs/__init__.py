"""One function per workflow rule: plain paths and settings in, artifacts out.

The Snakemake scripts in ``workflow/scripts`` only unpack ``snakemake.input/output`` and the rule's settings and
call these, so tests can run every stage without Snakemake. One module per group of rules with the same library
code: a rule's code fingerprint is the closure of the modules its script imports (``superposition.fingerprint``),
so a module here must import only what its rules use.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from ..settings import execution_record, job_settings


def start_job(smk: Any, torch_threads: bool = False) -> dict[str, Any]:
    """Send the job's output to its log, size torch's thread pool (model jobs only: importing torch costs
    seconds) and return the rule's settings from the config (schema defaults filled in)."""
    if smk.log:
        Path(smk.log[0]).parent.mkdir(parents=True, exist_ok=True)
        handle = open(smk.log[0], "w", buffering=1)
        sys.stdout = sys.stderr = handle
    if torch_threads:
        import torch

        torch.set_num_threads(int(smk.threads))
    return job_settings(smk)


def execution_of(smk: Any) -> dict[str, Any]:
    """The execution keys the job's rule reads, for its artifacts' provenance."""
    return execution_record(smk.config, smk.rule, smk.wildcards.get("model"))


def facts_source(cfg: dict[str, Any]) -> dict[str, Any]:
    """The facts settings of a job, with the cache folder a CounterFact download goes to."""
    return {**cfg["facts"], "cache_dir": cfg["cache_dir"]}


def model_sizes(cfg: dict[str, Any]) -> dict[str, float | None]:
    """models.{name}.params_millions of the job's models (None: the figures use the counted parameters)."""
    return {name: entry["params_millions"] for name, entry in cfg["models"].items()}
