"""The GPU check script on the CPU with tiny sizes: every code path it takes on the GPU machine runs here first."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_every_section_on_the_cpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run([str(REPO / "benchmarks/gpu_check.sh"), str(tmp_path), "--tiny", "--device", "cpu"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert (tmp_path / "gpu_check.md").read_text().startswith("GPU check, ")
    # every case ran: the script reports a failing case as a row with an error and goes on
    assert result["errors"] == [] and not [r for section in ("correctness", "throughput", "gram_precision")
                                           for r in result[section] if "error" in r]
    assert {r["model"] for r in result["correctness"]} == {"gpt2", "gptj", "gpt_neox", "llama", "gemma3_text",
                                                           "smollm2-shape"}
    for row in result["correctness"]:
        # float32 statistics against the float64 pass of the same weights: float32 rounding, far under 1e-5
        assert row["C_rel_err_fp32"] < 1e-5, row
        # bf16 weights change the keys: a visible error, larger than float32's
        assert row["C_rel_err_bf16_weights"] > 10 * row["C_rel_err_fp32"], row
        assert row["keys_rel_err_batch1_vs_16"] < 1e-5, row
    assert [(r["shape"], r["dtype"]) for r in result["throughput"]] == [
        ("smollm2", "float32"), ("gpt2", "float32"), ("gpt2", "bfloat16"), ("llama2_7b", "bfloat16")]
    assert all(r["ours_tokens_per_s"] > 0 and r["rome_over_ours"] > 0 for r in result["throughput"])
    grams = {r["method"]: r for r in result["gram_precision"]}
    assert grams["float32"]["C_rel_err"] < 1e-5 and grams["split_bf16"]["C_rel_err"] < 1e-4
    assert grams["float64"]["C_rel_err"] == 0.0  # the reference itself: a consistency check
    assert len(result["paper_hours"]) == 11 and "tiny sizes" in proc.stdout
