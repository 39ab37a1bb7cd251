"""Test-only behaviour of statistics jobs, loaded by every Python process of a test's run through PYTHONPATH
(workflow_helpers.injected_env; sbatch --export=ALL passes the environment into a SLURM job, Snakemake on to the
script's interpreter). Nothing happens unless one of these variables is set; once superposition.stats is imported:

- SUPERPOSITION_TEST_BATCH_SLEEP (seconds; tests/test_slurm.py): each batch of a statistics job sleeps that long,
  in the first process that runs batches only, so a resumed job runs at full speed; every batch and the end of each
  collect_second_moments call is a JSON line in SUPERPOSITION_TEST_TRACE (flushed at once: a SIGKILL loses none).
- SUPERPOSITION_TEST_STOP_AT_CHECKPOINT (tests/test_fault_injection.py): a statistics job stops itself (SIGSTOP)
  right after writing a checkpoint, so that the test's SIGKILL lands mid-shard with the checkpoint on disk however
  fast the job's batches are (a tiny model's take milliseconds, less than the test's poll).
"""

import os
import sys

if os.environ.get("SUPERPOSITION_TEST_BATCH_SLEEP") or os.environ.get("SUPERPOSITION_TEST_STOP_AT_CHECKPOINT"):
    import importlib.abc
    import importlib.machinery
    import json
    import signal
    import time

    def _trace(**record):
        with open(os.environ["SUPERPOSITION_TEST_TRACE"], "a") as handle:
            handle.write(json.dumps({"pid": os.getpid(), "time": time.time(), **record}) + "\n")

    def _slow_batches(module, seconds):
        trace = os.environ["SUPERPOSITION_TEST_TRACE"]
        state = {}
        add_batch, collect = module.GramAccumulator.add_batch, module.collect_second_moments

        def slow_add_batch(self, ids, mask, positions, batch_index):
            if "slow" not in state:  # the first process to run a batch is the slow one
                state["slow"] = not os.path.exists(trace) or "batch" not in open(trace).read()
            if state["slow"]:
                time.sleep(seconds)
            n = add_batch(self, ids, mask, positions, batch_index)
            _trace(batch=batch_index, slow=state["slow"])
            return n

        def traced_collect(*args, **kwargs):
            try:
                result = collect(*args, **kwargs)
            except BaseException as err:
                _trace(raised=f"{type(err).__name__}: {err}")
                raise
            _trace(finished=result["n_batches"])
            return result

        module.GramAccumulator.add_batch = slow_add_batch
        module.collect_second_moments = traced_collect

    def _stop_at_checkpoint(module):
        save = module._save_sums

        def save_then_stop(*args, final, **kwargs):
            save(*args, final=final, **kwargs)
            if not final:  # a checkpoint, not the job's output
                os.kill(os.getpid(), signal.SIGSTOP)

        module._save_sums = save_then_stop

    def _patch(module):
        if os.environ.get("SUPERPOSITION_TEST_BATCH_SLEEP"):
            _slow_batches(module, float(os.environ["SUPERPOSITION_TEST_BATCH_SLEEP"]))
        if os.environ.get("SUPERPOSITION_TEST_STOP_AT_CHECKPOINT"):
            _stop_at_checkpoint(module)

    class _PatchStats(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "superposition.stats":
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                _patch(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _PatchStats())
