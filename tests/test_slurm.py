"""The workflow through SLURM (profiles/slurm) on a one-node local cluster with a fake GPU.

tests/slurm/start-local-slurm.sh installs Debian's slurmctld/slurmd/munge when missing and starts them;
the module fixture stops them at the end. The cluster tests skip only where that cannot work (not root,
or no apt-get and no SLURM). Each SLURM job runs Snakemake again inside the allocation, so the tiny run
takes a few minutes; every subprocess is bounded by `timeout`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import json

import h5py
import numpy as np
import pytest
import yaml

from workflow_helpers import injected_env, make_tiny_model, run_folder, snakemake, tiny_settings, write_config

from superposition import config as sp_config
from superposition import sizing

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "profiles" / "slurm"
SCRIPTS = Path(__file__).resolve().parent / "slurm"
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
GPU_RULES = ["activation_stats", "keys", "fact_predictions", "lifelong_edit"]
# rules whose memory and runtime come from the model's size (superposition.sizing), not from the profile
SIZED_RULES = ["model_snapshot", "corpus_shards", "activation_stats", "covariance", "whitening", "matrices"]
LAYER_GROUP = ["covariance", "whitening", "matrices"]
# The local cluster's partitions (tests/slurm/start-local-slurm.sh).
LOCAL_ENV = {
    "SUPERPOSITION_SLURM_ACCOUNT": "",  # no accounting database: no account
    "SUPERPOSITION_SLURM_PARTITION": "cpu",
    "SUPERPOSITION_SLURM_GPU_PARTITION": "gpu",
}


def in_run_folder(cmd) -> tuple[Path, list[str]]:
    """A ``python -m snakemake`` command line in workflow_helpers.run_folder's folder (each test's run its own
    .snakemake); any other command in the repository."""
    cmd = [str(c) for c in cmd]
    if cmd[:len(SNAKEMAKE)] != SNAKEMAKE:
        return REPO, cmd
    folder, args = run_folder(cmd[len(SNAKEMAKE):])
    return folder, [*SNAKEMAKE, *args]


def run(cmd, seconds, *, cwd=None, env=None, check=True):
    """A subprocess under `timeout -k 10 seconds` (Snakemake in its run folder unless ``cwd``); output as text."""
    folder, cmd = in_run_folder(cmd)
    cwd = folder if cwd is None else cwd
    full = ["timeout", "-k", "10", str(seconds), *map(str, cmd)]
    proc = subprocess.run(full, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    if proc.returncode == 124:
        raise AssertionError(f"timed out after {seconds}s: {' '.join(full)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {' '.join(full)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


# ---------------------------------------------------------------------------------- profile, no cluster
# (dry runs and --list through workflow_helpers.snakemake: its failing scontrol spares the SLURM plugin's probe)


def test_profile_names_only_workflow_rules_and_requests_gpus():
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    assert profile["executor"] == "slurm" and profile["retries"] == 1
    rules = set(snakemake("--list", "--workflow-profile", "none").stdout.split())
    named = set(profile["set-resources"]) | set(profile["set-threads"])
    assert named <= rules, f"profile names rules the workflow does not have: {named - rules}"
    for rule in GPU_RULES:
        res = profile["set-resources"][rule]
        assert res["gpu"] == 1 and res["slurm_partition"] == "$SUPERPOSITION_SLURM_GPU_PARTITION"
        if rule not in SIZED_RULES:
            assert "attempt" in str(res["mem_mb"]) and "attempt" in str(res["runtime"])
    for rule in SIZED_RULES:  # the profile would override the rule's own sizes
        assert not {"mem_mb", "runtime"} & set(profile["set-resources"].get(rule, {})), rule
    assert "model_snapshot" not in profile["set-resources"]  # no GPU: the CPU partition, sized by the rule
    assert all(profile["groups"][rule] == "layers_{model}" for rule in LAYER_GROUP)
    assert profile["config"] == ["gpu_memory_gb=80"]
    for rule, res in profile["set-resources"].items():
        if rule not in GPU_RULES:
            assert "gpu" not in res and "slurm_partition" not in res, rule
    assert profile["default-resources"]["slurm_partition"] == "$SUPERPOSITION_SLURM_PARTITION"


def test_profile_dry_run_resolves_partitions_and_scales_with_attempt():
    env = {**LOCAL_ENV, "SUPERPOSITION_SLURM_ACCOUNT": "acct42", "SUPERPOSITION_SLURM_GPU_PARTITION": "gpuq"}
    out = snakemake("-n", "--forceall", "--workflow-profile", str(PROFILE), "--executor", "dryrun",
                    env={**os.environ, **env}).stdout
    stats = out.split("rule activation_stats:")[1].split("resources:")[1].splitlines()[0]
    assert "slurm_partition=gpuq" in stats and "gpu=1" in stats and "slurm_account=acct42" in stats
    cov = out.split("rule covariance:")[1].split("resources:")[1].splitlines()[0]
    assert "slurm_partition=cpu" in cov and "gpu=" not in cov
    snapshot = out.split("rule model_snapshot:")[1].split("resources:")[1].splitlines()[0]
    assert "slurm_partition=cpu" in snapshot and "gpu=" not in snapshot
    # each model's statistics jobs are sized from that model (attempt 1): superposition.sizing's numbers
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    jobs = re.findall(r"rule activation_stats:.*?wildcards: model=(\S+), shard=\d+, block=(\S+)\n.*?resources: .*?"
                      r"mem_mb=(\d+),.*?runtime=(\d+)", out, re.S)
    assert {model for model, *_ in jobs} == set(cfg["models"]), jobs
    for model, block, mem_mb, runtime in jobs:
        entry = cfg["models"][model]
        manifest = REPO / cfg["results"] / "models" / model / "model.json"
        size = sizing.model_size(model, params_millions=entry["params_millions"], n_layers=entry["n_layers"],
                                 manifest=json.loads(manifest.read_text()) if manifest.is_file() else None)
        corpus = REPO / cfg["results"] / "corpus" / model / "manifest.json"
        tokens = sizing.shard_tokens(cfg["corpus"], cfg["corpus"]["n_shards"], None,
                                     json.loads(corpus.read_text()) if corpus.is_file() else None)
        want = sizing.stats_job(size, len(sp_config.block_layers(block)), tokens,
                                sizing.StatsSettings.from_config(cfg["stats"]))
        assert (int(mem_mb), int(runtime)) == (want["mem_mb"], want["runtime"]), (model, block)
    assert len({mem for _, _, mem, _ in jobs}) == 2  # two models, two sizes


def test_a_block_that_cannot_fit_the_gpu_is_refused_when_the_dag_is_built(tmp_path):
    models = {"big": {"source": "hub", "id": "org/big", "n_layers": 40, "d_m": 13824, "params_millions": 13016,
                      "layer_block_size": 40}}
    cfg = write_config(tmp_path, models=models, stats={"model_dtype": "bfloat16", "max_tokens_per_batch": 16384})
    proc = snakemake("-n", "--workflow-profile", str(PROFILE), "--configfile", str(cfg),
                     env={**os.environ, **LOCAL_ENV}, check=False)
    text = proc.stdout + proc.stderr
    need = sizing.stats_gpu_bytes(sizing.ModelSize("big", 13016e6, 40, 13824, "config"), 40,
                                  sizing.StatsSettings("bfloat16", "float32", 16384))["total"]
    assert proc.returncode != 0
    assert "plan refused: big: the statistics block 0-39 (40 layers, d_m 13824)" in text, text[-3000:]
    assert f"needs {need:,} bytes" in text and "set models.big.layer_block_size: 31" in text
    # the block size it suggests is accepted
    models["big"]["layer_block_size"] = 31
    cfg = write_config(tmp_path, models=models, stats={"model_dtype": "bfloat16", "max_tokens_per_batch": 16384})
    snakemake("-n", "--workflow-profile", str(PROFILE), "--configfile", str(cfg), env={**os.environ, **LOCAL_ENV})


# ------------------------------------------------------------------------------------- local cluster


LOCK_DIR = Path("/run/slurm-local")


@pytest.fixture(scope="module")
def slurm_cluster():
    """The machine's one local cluster, shared by concurrent test sessions: the last one out stops it.

    start.lock serialises starting and stopping; every session holds a shared lock on users.lock while it
    uses the cluster, so a session that ends first leaves the cluster running for the others.
    """
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root (it installs Debian packages and starts daemons)")
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        pytest.skip("SLURM is not installed and apt-get is not available to install it")
    import fcntl

    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    start_lock = open(LOCK_DIR / "start.lock", "w")
    users_lock = open(LOCK_DIR / "users.lock", "w")
    try:
        fcntl.flock(start_lock, fcntl.LOCK_EX)
        proc = subprocess.run(["timeout", "-k", "10", "300", "bash", str(SCRIPTS / "start-local-slurm.sh")],
                              capture_output=True, text=True)
        if proc.returncode == 3:
            pytest.skip(f"SLURM packages could not be installed: {proc.stderr[-1500:]}")
        assert proc.returncode == 0, f"local SLURM cluster did not start ({proc.returncode}):\n{proc.stderr[-4000:]}"
        fcntl.flock(users_lock, fcntl.LOCK_SH)
        fcntl.flock(start_lock, fcntl.LOCK_UN)
        yield
        fcntl.flock(start_lock, fcntl.LOCK_EX)
        fcntl.flock(users_lock, fcntl.LOCK_UN)
        try:
            fcntl.flock(users_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # another session is still using the cluster
        subprocess.run(["timeout", "-k", "10", "90", "bash", str(SCRIPTS / "stop-local-slurm.sh")],
                       capture_output=True, text=True)
    finally:
        users_lock.close()
        start_lock.close()


def local_profile(dest: Path, logdir: Path) -> Path:
    """profiles/slurm/config.yaml sized for the 2-core test node; partitions still come from the env vars.

    Memory and CPU counts are scaled down (the node cannot grant 64 GB or 8 CPUs); everything else, the
    GPU requests, partitions, expressions and retries, is the real profile's.
    """
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    for res in profile["set-resources"].values():
        if "mem_mb" in res:
            res["mem_mb"] = "1500 * attempt"
        if "cpus_per_gpu" in res:
            res["cpus_per_gpu"] = 1
        if "runtime" in res:
            res["runtime"] = "10 * attempt"
    profile["set-threads"] = {rule: 1 for rule in profile["set-threads"]}
    profile["default-resources"]["mem_mb"] = "1500 * attempt"
    profile.update({
        "latency-wait": 5,
        "jobs": 4,
        "cores": 2,  # the node's CPUs: every job here asks for one
        "slurm-status-command": "squeue",  # no slurmdbd here: sacct cannot answer
        "slurm-init-seconds-before-status-checks": 1,
        "slurm-logdir": str(logdir),
        "slurm-keep-successful-logs": True,
    })
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return dest


def tiny_setup(tmp: Path, snapshot_path: str, results: str = "results") -> Path:
    """The tiny random Llama, facts and config of test_workflow.tiny_run."""
    make_tiny_model(tmp, snapshot_path)
    run_dir = tmp / results
    run_dir.mkdir(parents=True, exist_ok=True)
    return write_config(run_dir, **tiny_settings(tmp))


def matrix_targets(cfg: Path) -> list[str]:
    results = yaml.safe_load(cfg.read_text())["results"]
    return [f"{results}/matrices/tiny/layer-{layer}.h5" for layer in range(3)]


def slurm_jobs(output: str) -> dict[str, dict[str, str]]:
    """SLURM job id -> `scontrol show job -o` fields, for every job Snakemake says it submitted."""
    ids = re.findall(r"has been submitted with SLURM jobid (\d+)", output)
    jobs = {}
    for jobid in ids:
        line = run(["scontrol", "show", "job", "-o", jobid], 30).stdout.strip()
        fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
        jobs[jobid] = fields
    return jobs


def rule_of(fields: dict[str, str]) -> str:
    """The rule of a SLURM job from its comment (rule_<rule>_wildcards_...), or its group (layers_<model>_...)."""
    name = fields["Comment"].split("_wildcards_")[0].removeprefix("rule_")
    return "layers_tiny" if name.startswith("layers_tiny_") else name


class Background:
    """A Snakemake run through the cluster started now and collected later (its output in files, not pipes)."""

    def __init__(self, cmd, seconds: int, folder: Path, env: dict):
        cwd, cmd = in_run_folder(cmd)
        self.cmd = ["timeout", "-k", "10", str(seconds), *map(str, cmd)]
        self.out, self.err = folder / "stdout", folder / "stderr"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(self.cmd, cwd=cwd, env={**os.environ, **env}, stdout=out, stderr=err,
                                         text=True)

    def result(self, timeout: float) -> subprocess.CompletedProcess:
        self.proc.wait(timeout)
        proc = subprocess.CompletedProcess(self.cmd, self.proc.returncode, self.out.read_text(), self.err.read_text())
        if proc.returncode == 124:
            raise AssertionError(f"timed out: {' '.join(self.cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
        return proc

    def stop(self) -> None:
        if self.proc.poll() is None:  # SIGTERM: `timeout` passes it on to Snakemake
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="module")
def failing_job(slurm_cluster, tmp_path_factory):
    """The run of test_a_failing_job_is_retried_...: a job that is submitted and runs on the node (valid
    partitions) but fails, since the local model does not exist. Its two attempts mostly wait for their status
    polls; under pytest-xdist the cluster tests run side by side, each on its worker."""
    tmp = tmp_path_factory.mktemp("failing_job")
    cfg = write_config(tmp, models={"tiny": {"source": "local", "path": str(tmp / "nothing"), "n_layers": 3}})
    profile = local_profile(tmp / "profile", tmp / "slurm_logs")
    results = yaml.safe_load(cfg.read_text())["results"]
    run = Background([*SNAKEMAKE, f"{results}/models/tiny/model.json", "--workflow-profile", profile,
                      "--configfile", cfg], 300, tmp, LOCAL_ENV)
    yield run, results
    run.stop()


def test_tiny_workflow_through_slurm_matches_a_local_run(slurm_cluster, tiny_run, smollm2_snapshot,
                                                         tmp_path):
    cfg_slurm = tiny_setup(tmp_path, smollm2_snapshot["path"], "via_slurm")
    profile = local_profile(tmp_path / "profile", tmp_path / "slurm_logs")
    # the local reference: the session's tiny run (the same tiny model, facts and settings; its editing section
    # reaches no matrix)
    _, cfg_local = tiny_run

    def matrix_settings(path):  # all but the paths, the model's folder and the editing section
        cfg = yaml.safe_load(path.read_text())
        cfg["facts"].pop("path")
        return {k: v for k, v in cfg.items() if k not in ("results", "cache_dir", "models", "editing")}

    assert matrix_settings(cfg_local) == matrix_settings(cfg_slurm)

    started = time.monotonic()
    proc = run([*SNAKEMAKE, *matrix_targets(cfg_slurm), "--workflow-profile", profile, "--configfile", cfg_slurm],
               300, env=LOCAL_ENV, check=False)
    slurm_seconds = time.monotonic() - started
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"SLURM run failed:\n{text[-8000:]}"
    assert "Falling back to 'sacct'" not in text  # the states came from squeue

    # every job went through sbatch and finished there
    jobs = slurm_jobs(text)
    rules = {rule_of(fields) for fields in jobs.values()}
    assert {"model_snapshot", "corpus_shards", "activation_stats", "keys", "layers_tiny"} <= rules, rules
    assert all(fields["JobState"] == "COMPLETED" for fields in jobs.values()), jobs
    # the 3 layers' covariance -> whitening -> matrices chains (9 jobs) were one SLURM job, the group layers_tiny:
    # model_snapshot, corpus_shards, keys, known_facts, 2 x activation_stats and that group
    submissions = re.findall(r"has been submitted with SLURM jobid (\d+)", text)
    assert len(submissions) == len(set(submissions)) == 7, sorted(rules)
    assert not set(LAYER_GROUP) & rules, rules  # none of them was submitted on its own
    [group] = [f for f in jobs.values() if rule_of(f) == "layers_tiny"]
    assert group["Comment"] == "rule_layers_tiny_covariance_matrices_whitening", group  # the plugin names its rules
    group_log = Path(group["StdOut"]).read_text()
    for rule in LAYER_GROUP:
        for layer in range(3):
            assert re.search(rf"rule {rule}:\n(.*\n)*?\s+wildcards: model=tiny, layer={layer}\n", group_log), (rule, layer)
    by_rule = {}
    for fields in jobs.values():
        by_rule.setdefault(rule_of(fields), []).append(fields)
    # the GPU rules asked SLURM for the GPU, on the GPU partition; the CPU rules did not
    for rule in ["activation_stats", "keys"]:
        for fields in by_rule[rule]:
            assert fields["Partition"] == "gpu" and "gres:gpu:1" in fields.get("TresPerJob", ""), fields
    assert len(by_rule["activation_stats"]) == 2
    # the statistics jobs asked for what superposition.sizing gives the tiny model at submission (attempt 1), when
    # its snapshot and the counted tokens exist
    results = Path(yaml.safe_load(cfg_slurm.read_text())["results"])
    size = sizing.model_size("tiny", params_millions=1.6, n_layers=3,
                             manifest=json.loads((results / "models/tiny/model.json").read_text()))
    tokens = sizing.shard_tokens({}, 2, corpus_manifest=json.loads((results / "corpus/tiny/manifest.json").read_text()))
    want = sizing.stats_job(size, 3, tokens, sizing.StatsSettings(max_tokens_per_batch=256))
    for fields in by_rule["activation_stats"]:
        assert fields["MinMemoryNode"] == f"{want['mem_mb']}M", fields
        assert fields["TimeLimit"] == f"00:{want['runtime']:02d}:00", fields
    for rule in ["layers_tiny", "corpus_shards", "model_snapshot"]:
        for fields in by_rule[rule]:
            assert fields["Partition"] == "cpu" and "gpu" not in fields.get("TresPerJob", ""), fields

    for slurm_file, local_file in zip(matrix_targets(cfg_slurm), matrix_targets(cfg_local)):
        with h5py.File(slurm_file) as a, h5py.File(local_file) as b:
            np.testing.assert_allclose(a["P"][()], b["P"][()], rtol=0, atol=1e-6)
            assert list(a["case_ids"][()]) == list(b["case_ids"][()])
    print(f"SLURM run: {len(jobs)} jobs in {slurm_seconds:.0f} s")


def test_unknown_partition_is_reported_with_the_rule_name(slurm_cluster, tmp_path):
    cfg = write_config(tmp_path, models={"tiny": {"source": "local", "path": str(tmp_path / "nothing"),
                                                  "n_layers": 3}})
    profile = local_profile(tmp_path / "profile", tmp_path / "slurm_logs")
    results = yaml.safe_load(cfg.read_text())["results"]
    env = {**LOCAL_ENV, "SUPERPOSITION_SLURM_PARTITION": "no_such_partition"}  # model_snapshot: the CPU partition
    proc = run([*SNAKEMAKE, f"{results}/models/tiny/model.json", "--workflow-profile", profile, "--configfile", cfg],
               120, env=env, check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "SLURM sbatch failed" in text and "Invalid partition name specified" in text, text[-5000:]
    assert "Error in rule model_snapshot" in text and "-p no_such_partition" in text
    # retries: 1 resubmits once, with the profile's sizes scaled by attempt=2
    calls = re.findall(r"sbatch --parsable .*", text)
    assert len(calls) == 2 and "--gpus" not in calls[0]  # the snapshot asks for no GPU
    # no params_millions, d_m or snapshot: the fixed sizes of a model of unknown size, times attempt
    mem, minutes = sizing.UNKNOWN_SIZE_JOB["mem_mb"], sizing.UNKNOWN_SIZE_JOB["runtime"]
    assert f"--mem {mem}" in calls[0] and f"-t {minutes} " in calls[0], calls
    assert f"--mem {2 * mem}" in calls[1] and f"-t {2 * minutes} " in calls[1], calls


def test_a_failing_job_is_retried_with_more_memory_and_then_names_its_log(failing_job):
    """The job is submitted and runs on the node (valid partitions) but fails: the local model does not exist."""
    run, results = failing_job
    proc = run.result(320)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    jobids = re.findall(r"has been submitted with SLURM jobid (\d+)", text)
    assert len(jobids) == 2 and "Trying to restart job" in text, text[-5000:]  # the first attempt and one retry
    sizes = re.findall(r"resources: .*?mem_mb=(\d+).*?runtime=(\d+)", text)
    mem, minutes = sizing.UNKNOWN_SIZE_JOB["mem_mb"], sizing.UNKNOWN_SIZE_JOB["runtime"]
    assert (str(mem), str(minutes)) in sizes and (str(2 * mem), str(2 * minutes)) in sizes, sizes  # attempt 2: twice
    slurm_log = f"slurm_logs/rule_model_snapshot/tiny/{jobids[-1]}.log"
    assert slurm_log in text  # the last error names the SLURM log of the last attempt ...
    assert "Error in rule model_snapshot" in text
    log = f"{results}/logs/model_snapshot/tiny.log"
    assert log in text, text[-5000:]  # the error names the rule's log ...
    assert "has no config.json" in Path(log).read_text()  # ... which says what went wrong


# -------------------------------------------------------------------------- time limit, resubmission, resume

def _h5_datasets(path) -> dict[str, np.ndarray]:
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def test_a_statistics_job_killed_at_its_time_limit_resumes_from_its_checkpoint_on_resubmission(
        slurm_cluster, smollm2_snapshot, tmp_path):
    """`sbatch -t 1` for the first attempt of a statistics job that needs longer: SLURM's time limit ends it
    (TIMEOUT; SIGTERM, SIGKILL KillWait = 5 s later), Snakemake's retry resubmits it with more time, and the retry
    resumes from the checkpoint the first attempt left, to the bits of an uninterrupted local job."""
    make_tiny_model(tmp_path, smollm2_snapshot["path"])
    settings = tiny_settings(tmp_path)
    # 300 short documents, one a batch: 150 batches a shard, each checkpointed; 1 s each (injected) makes the first
    # attempt need 150 s, more than the minute it gets, while every checkpoint is 1 s from the last, well within
    # KillWait
    settings["corpus"].update(n_documents=300)
    settings["stats"].update(checkpoint_every=1, max_batch_size=1)
    run_dir = tmp_path / "results"
    run_dir.mkdir()
    cfg = write_config(run_dir, **settings)
    results = Path(yaml.safe_load(cfg.read_text())["results"])
    block = sp_config.block_name(list(range(3)))
    target = results / "stats" / "tiny" / f"shard-0.block-{block}.h5"
    checkpoint = results / "checkpoints" / "tiny" / f"shard-0.block-{block}.h5"
    rule_log = results / "logs" / "activation_stats" / "tiny" / f"shard-0.block-{block}.log"

    # the reference: the same job run locally, uninterrupted; then moved aside, so that only it is redone below
    snakemake(str(target), "--cores", "2", "--configfile", str(cfg))
    reference = tmp_path / "reference.h5"
    target.rename(reference)
    assert not checkpoint.exists()

    trace = tmp_path / "trace.jsonl"
    # each batch of the first attempt sleeps 1 s, every batch traced (tests/inject/sitecustomize.py)
    env = injected_env({**os.environ, **LOCAL_ENV}, SUPERPOSITION_TEST_BATCH_SLEEP="1",
                       SUPERPOSITION_TEST_TRACE=str(trace))
    profile_dir = local_profile(tmp_path / "profile", tmp_path / "slurm_logs")
    profile = yaml.safe_load((profile_dir / "config.yaml").read_text())
    profile["set-resources"]["activation_stats"]["runtime"] = "1 if attempt == 1 else 10"  # minutes
    (profile_dir / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))

    started = time.monotonic()
    proc = run([*SNAKEMAKE, target, "--workflow-profile", profile_dir, "--configfile", cfg], 420, env=env,
               check=False)
    seconds = time.monotonic() - started
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"SLURM run failed:\n{text[-8000:]}"

    # two SLURM jobs of the rule: the first ended by its time limit, the second, with more time, completed
    jobs = slurm_jobs(text)
    assert [rule_of(fields) for fields in jobs.values()] == ["activation_stats"] * 2, jobs
    first, second = jobs.values()
    assert (first["JobState"], first["TimeLimit"]) == ("TIMEOUT", "00:01:00"), first
    assert (second["JobState"], second["TimeLimit"]) == ("COMPLETED", "00:10:00"), second
    assert f"SLURM-job '{first['JobId']}' failed, SLURM status is: 'TIMEOUT'" in text, text[-5000:]
    assert "Trying to restart job" in text

    # the first attempt (slowed) ran batches 0..k-1, stopped at its checkpoint after batch k-1 on SLURM's SIGTERM;
    # the second (full speed) started at batch k
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    pids = list(dict.fromkeys(r["pid"] for r in records))
    assert len(pids) == 2, records[-5:]  # the slowed first attempt and the retry
    one = [r for r in records if r["pid"] == pids[0]]
    two = [r for r in records if r["pid"] == pids[1]]
    batches_one = [r["batch"] for r in one if "batch" in r]
    batches_two = [r["batch"] for r in two if "batch" in r]
    assert all(r["slow"] for r in one if "batch" in r) and not any(r["slow"] for r in two if "batch" in r)
    stop = batches_one[-1] + 1
    n_batches = two[-1]["finished"]
    assert batches_one == list(range(stop)) and 0 < stop < n_batches, batches_one
    stopped = one[-1].get("raised", "")  # at its next checkpoint, not killed by the second SIGTERM or SIGKILL
    assert stopped.startswith(f"JobStopped: stopped on SIGTERM at batch {stop}/{n_batches}"), one[-3:]
    assert batches_two == list(range(stop, n_batches)), batches_two[:5]
    log = rule_log.read_text()  # the retry's log (each attempt rewrites it)
    assert f"resuming from {checkpoint} at batch {stop}/{n_batches}" in log, log[-3000:]
    assert not checkpoint.exists()  # removed once the output is written
    # how long the first attempt ran in SLURM (RunTime, h:mm:ss) and in its batches
    runtime = sum(int(x) * 60 ** i for i, x in enumerate(reversed(first["RunTime"].split(":"))))
    batch_seconds = one[-1]["time"] - one[0]["time"]

    # the resumed result is the uninterrupted one, bit for bit (every dataset; the attributes differ in timings)
    got, want = _h5_datasets(target), _h5_datasets(reference)
    assert sorted(got) == sorted(want) and got
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].tobytes() == want[name].tobytes(), name
    print(f"time limit: attempt 1 ran {runtime} s in SLURM ({batch_seconds:.0f} s of batches), stopped at batch "
          f"{stop}/{n_batches}; attempt 2 resumed at batch {batches_two[0]}; {seconds:.0f} s in all")
