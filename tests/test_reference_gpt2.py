"""The paper's GPT-2-small layer-0 reference values (needs the Hugging Face hub and the ROME data URL).

Q does not depend on the corpus statistics, so the keys alone must reproduce the paper's numbers. The P values
(Mayakovsky -> Bukovsky 0.98518, Mac OS X 10.1 -> Windows 8.1 0.94143) also need C from 100,000 Wikipedia
articles; they are documented in the README and checked only by a full paper rebuild.
"""

import os
import socket

import numpy as np
import pytest

PAPER_CASE_IDS = [12328, 19640, 17180]


def hub_reachable() -> bool:
    if os.environ.get("SUPERPOSITION_ONLINE_TESTS") != "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        return False


@pytest.mark.network
@pytest.mark.skipif(not hub_reachable(), reason="needs the Hugging Face hub (set SUPERPOSITION_ONLINE_TESTS=1 online)")
def test_gpt2_small_layer0_q_matches_the_paper(tmp_path):
    from superposition import facts, keys, models

    spec = models.ModelSpec.from_config("gpt2", {"source": "hub", "id": "gpt2", "n_layers": 12})
    manifest = models.snapshot(spec, tmp_path, tmp_path)
    model, tokenizer = models.load(manifest, "cpu", "float32")
    probe, _ = facts.load_facts({"source": "counterfact", "case_ids": PAPER_CASE_IDS, "cache_dir": str(tmp_path)})
    run = keys.run_prompts(model, tokenizer, probe, layers=[0], predictions=False)
    K = run.keys[:, 0].astype(np.float64)
    Q = K @ K.T
    np.testing.assert_allclose([Q[0, 0], Q[0, 1], Q[1, 2]], [141.3767, 28.9537, 36.9960], rtol=1e-4)
