"""Helpers of the workflow tests: Snakemake in a subprocess, the dry-run job table, the tiny model and config."""

from __future__ import annotations

import json
import os
import queue
import re
import select
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def _without_slurm_probe(env: dict | None) -> dict:
    """The environment with a ``scontrol`` that fails at once in front of PATH.

    Snakemake imports every installed executor plugin at start; the SLURM plugin then runs ``scontrol show config``
    (snakemake-executor-plugin-slurm's job_status_query.get_min_job_age), which waits 9 s for a controller where
    SLURM's client is installed but no slurmctld runs, as here outside tests/test_slurm.py (which starts one and
    does not use this helper). A failing scontrol is what the plugin expects where there is no cluster.
    """
    env = dict(os.environ if env is None else env)
    if shutil.which("scontrol", path=env.get("PATH")):
        shim = Path(tempfile.gettempdir()) / f"superposition-no-slurm-{os.getuid()}"
        if not (shim / "scontrol").is_file():
            shim.mkdir(exist_ok=True)
            (shim / "scontrol.tmp").write_text("#!/bin/sh\nexit 1\n")
            (shim / "scontrol.tmp").chmod(0o755)
            (shim / "scontrol.tmp").replace(shim / "scontrol")
        env["PATH"] = f"{shim}{os.pathsep}{env.get('PATH', '')}"
    return env


class _Server:
    """One tests/snakemake_server.py process: Snakemake imported once, every command line in a forked child."""

    def __init__(self, env: dict):
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("snakemake_server.py"))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self._answer(120)  # "ready"

    def _answer(self, timeout: float) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.proc.kill()
            raise AssertionError(f"the Snakemake test server gave no answer within {timeout} s")
        return line

    def run(self, args, cwd, env: dict) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory() as tmp:
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            extra = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
            request = {"argv": list(args), "cwd": str(cwd), "env": env, "sys_path": extra,
                       "stdout": str(out), "stderr": str(err)}
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            code = json.loads(self._answer(900))["returncode"]
            return subprocess.CompletedProcess([*SNAKEMAKE, *args], code, out.read_text(), err.read_text())


_IDLE_SERVERS: "queue.SimpleQueue[_Server]" = queue.SimpleQueue()


def _forked_run(args, cwd, env: dict) -> subprocess.CompletedProcess:
    try:
        server = _IDLE_SERVERS.get_nowait()
    except queue.Empty:
        server = _Server(_without_slurm_probe(None))
    try:
        return server.run(args, cwd, env)
    finally:
        _IDLE_SERVERS.put(server)


def run_folder(args) -> tuple[Path, list[str]]:
    """Where a Snakemake command line of a test runs, and the command line to run there: beside its --configfile
    when that is outside the repository (a test's own), with the Snakefile named; else in the repository.

    Snakemake keeps its lock and metadata in the working directory's .snakemake, and every run deletes the whole
    lock folder when it ends: runs of concurrent test workers (pytest-xdist) must not share one. A config's
    dry runs and reruns find the metadata of its earlier runs there."""
    args = [str(a) for a in args]
    if "--configfile" not in args:
        return REPO, args
    config = Path(args[args.index("--configfile") + 1])
    if not config.is_absolute() or config.resolve().is_relative_to(REPO):
        return REPO, args
    return config.resolve().parent, ["--snakefile", str(REPO / "Snakefile"), *args]


def snakemake(*args, cwd=None, check=True, env=None, forked=True):
    """``python -m snakemake *args`` in a forked child of a server that has Snakemake imported already
    (tests/snakemake_server.py), or with ``forked=False`` in a fresh interpreter, in ``run_folder``'s folder unless
    ``cwd`` is given. The jobs of a run are the same subprocesses either way; what needs a process of its own to
    kill (tests/test_fault_injection.py, the SLURM runs of tests/test_slurm.py) starts ``python -m snakemake``
    itself, in the same folder."""
    folder, args = run_folder(args)
    cwd = folder if cwd is None else cwd
    env = _without_slurm_probe(env)
    if forked:
        proc = _forked_run(args, cwd, env)
    else:
        proc = subprocess.run([*SNAKEMAKE, *args], cwd=cwd, capture_output=True, text=True, timeout=900, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def injected_env(env: dict, **variables: str) -> dict:
    """``env`` with tests/inject first on PYTHONPATH (its sitecustomize gives statistics jobs the test-only
    behaviour the ``variables`` switch on) and the ``variables`` set."""
    path = os.pathsep.join(filter(None, [str(REPO / "tests" / "inject"), env.get("PYTHONPATH")]))
    return {**env, "PYTHONPATH": path, **variables}


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
        stats={"checkpoint_every": 1, "max_tokens_per_batch": 256},
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
