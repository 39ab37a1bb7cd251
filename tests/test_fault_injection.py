"""Killed jobs on the tiny workflow: SIGKILL in the middle of each kind of job, then snakemake again.

One run of the tiny workflow is killed (the whole process group, as a node failure or the OOM killer would) as soon
as a job of a kind not yet killed has started (its log is new or rewritten; a statistics job once its checkpoint
exists, so that the rerun resumes mid-shard: until one is killed, statistics jobs stop themselves after writing a
checkpoint, tests/inject/sitecustomize.py, as the tiny model's batches take less than a poll), once per kind. After
every kill no file under a final name may be invalid (every HDF5 file opens and its checksummed datasets read back,
every JSON parses), the stale lock is reported with the way out, and the last run ends with every dataset
identical, bit for bit, to the undisturbed tiny run. Before the first kill a second snakemake started on the same
results is refused by Snakemake's lock.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import yaml
from workflow_helpers import SNAKEMAKE, _without_slurm_probe, injected_env, run_folder, snakemake

# kind -> (the log that says one of its jobs has started, an artifact that says it is mid-way)
KINDS = {
    "activation_stats": ("logs/activation_stats/tiny/*.log", "checkpoints/tiny/*.h5"),
    "covariance": ("logs/covariance/tiny/*.log", None),
    "whitening": ("logs/whitening/tiny/*.log", None),
    "keys": ("logs/keys/tiny.log", None),
    "matrices": ("logs/matrices/tiny/*.log", None),
    "summaries": ("logs/summaries/tiny.log", None),
    "figure": ("logs/figure_heatmaps/tiny.log", None),
    "lifelong_edit": ("logs/lifelong_edit/tiny/*.log", None),
}


def _start(cfg: Path, env: dict) -> subprocess.Popen:
    folder, args = run_folder(["--cores", "2", "--configfile", str(cfg)])
    return subprocess.Popen([*SNAKEMAKE, *args], cwd=folder, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _kill_at_next_job(proc: subprocess.Popen, results: Path, remaining: set[str],
                      timeout: float = 300) -> tuple[str | None, list[str]]:
    """SIGKILL the run's process group once a job of a remaining kind has started (None if the run ended first);
    with the kinds seen starting, in order.

    A job has started when its log is new or rewritten (a job opens its log afresh): a job killed with another
    one's process group (two run at once) writes the same log again when it reruns."""
    def logs(pattern):
        found = {}
        for path in results.glob(pattern):
            try:
                found[path] = path.stat().st_mtime_ns
            except FileNotFoundError:  # removed between the listing and the stat
                pass
        return found

    seen = {kind: logs(log) for kind, (log, _) in KINDS.items()}
    started: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for kind in sorted(remaining):
            log, midway = KINDS[kind]
            if kind not in started and logs(log).items() - seen[kind].items():
                started.append(kind)
            if kind in started and (midway is None or any(results.glob(midway))):
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return kind, started
        if proc.poll() is not None:
            return None, started
        time.sleep(0.05)  # every job runs for seconds; polling faster only takes the CPU from them
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"no job of {sorted(remaining)} started within {timeout} s (started: {started})")


def _no_invalid_artifact(results: Path) -> None:
    """Every file under a final name is whole: HDF5 files open and every dataset reads (Fletcher-32 checked)."""
    for path in results.rglob("*"):
        if path.name.startswith(".") or not path.is_file() or "logs" in path.parts or "benchmarks" in path.parts:
            continue
        if path.suffix == ".h5":
            with h5py.File(path, "r") as f:
                f.visititems(lambda name, obj: obj[()] if isinstance(obj, h5py.Dataset) else None)
        elif path.suffix == ".json":
            json.loads(path.read_text())


def _datasets(results: Path) -> dict[str, np.ndarray]:
    out = {}
    for path in sorted(results.rglob("*.h5")):
        if path.name.startswith(".") or "checkpoints" in path.parts:
            continue
        with h5py.File(path, "r") as f:
            def keep(name, obj, rel=path.relative_to(results)):
                if isinstance(obj, h5py.Dataset) and "seconds" not in name:
                    out[f"{rel}:{name}"] = obj[()]
            f.visititems(keep)
    return out


def test_killed_jobs_of_every_kind_rerun_to_the_undisturbed_result(tiny_run, tmp_path):
    tiny_dir, tiny_cfg = tiny_run
    cfg = yaml.safe_load(tiny_cfg.read_text())
    results = tmp_path / "results"
    # the tiny run checkpoints after every batch, so one is on disk for most of a statistics job: the kill lands
    # mid-shard and the rerun resumes
    assert cfg["stats"]["checkpoint_every"] == 1
    cfg.update(results=str(results), cache_dir=str(tmp_path / "cache"))
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = _without_slurm_probe(None)

    def start(remaining):
        # until a statistics job is killed, each stops after writing a checkpoint: the kill finds it there
        stop = {"SUPERPOSITION_TEST_STOP_AT_CHECKPOINT": "1"} if "activation_stats" in remaining else {}
        return _start(cfg_path, injected_env(env, **stop))

    # a second snakemake on the same results while one runs: refused by the lock, saying why
    first = start(set(KINDS))
    locks = run_folder(["--configfile", str(cfg_path)])[0] / ".snakemake" / "locks"  # the run's own folder
    deadline = time.monotonic() + 120
    while not any(locks.glob("*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    second = snakemake("--cores", "1", "--configfile", str(cfg_path), check=False)
    assert second.returncode != 0
    assert "Directory cannot be locked" in second.stdout + second.stderr

    killed, rounds, log = [], [], []
    remaining = set(KINDS)
    proc = first
    while True:
        kind, started = _kill_at_next_job(proc, results, remaining)
        rounds.append(f"started {started}, killed {kind}")
        if kind is None:
            log.append(proc.stdout.read()[-3000:])
            break
        killed.append(kind)
        remaining.discard(kind)
        _no_invalid_artifact(results)
        if len(killed) == 1:  # the killed run's lock is left behind: reported with the way out
            stale = snakemake("--cores", "1", "--configfile", str(cfg_path), check=False)
            assert stale.returncode != 0 and "--unlock" in stale.stdout + stale.stderr
        snakemake("--unlock", "--configfile", str(cfg_path))
        proc = start(remaining)
    assert proc.returncode == 0, f"{rounds}\n{log[-1]}"
    assert sorted(killed) == sorted(KINDS), f"the run ended before every kind was killed; by round: {rounds}"
    print("by round:", *rounds, sep="\n  ")
    resumed = [p for p in results.glob("logs/activation_stats/tiny/*.log") if "resuming from" in p.read_text()]
    assert resumed, "the killed statistics job did not resume from its checkpoint"

    undisturbed, rerun = _datasets(tiny_dir / "results"), _datasets(results)
    assert rerun.keys() == undisturbed.keys()
    different = [name for name in rerun if not np.array_equal(rerun[name], undisturbed[name])]
    assert not different, different[:10]
    # and Snakemake sees nothing left to do
    assert "Nothing to be done" in snakemake("-n", "--configfile", str(cfg_path)).stdout
