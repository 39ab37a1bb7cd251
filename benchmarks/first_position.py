"""Per-layer excess kurtosis of off-diagonal P under each facts.prompt_mode, on a finished run (issue: keys at
the first position of a prompt are not knowledge keys).

Reuses the run's snapshots, fact selection and whitening (C is the same for every mode); recomputes the keys of
the pool's facts under each mode with the pipeline's own ``run_prompts``:

    .venv/bin/python benchmarks/first_position.py --results results --out benchmarks/out/first_position.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from superposition import facts as facts_mod
from superposition import keys as keys_mod
from superposition import matrices, models, summaries, whitening

MODES = ("as_is", "bos", "context", "exclude_first")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="results", help="a finished run's results folder")
    parser.add_argument("--models", nargs="*", default=None, help="model names (default: every snapshot)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    res = Path(args.results)
    names = args.models or sorted(p.name for p in (res / "models").iterdir() if (p / "model.json").is_file())
    selection = json.loads((res / "facts/selection.json").read_text())
    m = len(selection["selected"])
    pool_facts, _ = facts_mod.load_facts({"source": "probe", "case_ids": selection["pool"]})

    runs, flags = {}, {}
    for name in names:
        manifest = models.read_manifest(res / "models" / name / "model.json")
        model, tokenizer = models.load(manifest, "cpu", "float32")
        layers = list(range(manifest["n_layers"]))
        runs[name] = {}
        for mode in ("as_is", "bos", "context"):
            run = keys_mod.run_prompts(model, tokenizer, pool_facts, layers=layers, predictions=False,
                                       context_templates=list(keys_mod.CONTEXT_PRESET) if mode == "context" else None,
                                       prepend_bos=mode == "bos")
            runs[name][mode] = run
        flags[name] = {f.case_id for f, flag in zip(pool_facts, runs[name]["as_is"].first_position) if flag}
        del model
    excluded = set().union(*flags.values())
    kept = [i for i, f in enumerate(pool_facts) if f.case_id not in excluded][:m]
    rows_of = {"as_is": list(range(m)), "bos": list(range(m)), "context": list(range(m)), "exclude_first": kept}

    lines = []
    for name in names:
        manifest = models.read_manifest(res / "models" / name / "model.json")
        selected_flagged = [f for f in pool_facts[:m] if f.case_id in flags[name]]
        lines.append(f"\n{name}: {len(selected_flagged)} of the {m} selected facts have their subject's last token "
                     f"first: " + ", ".join(f"{f.subject!r} ({f.case_id})" for f in selected_flagged))
        lines.append("| layer | " + " | ".join(MODES) + " |")
        lines.append("|---:|" + "---:|" * len(MODES))
        for layer in range(manifest["n_layers"]):
            w, _ = whitening.read_whitening(res / f"whitening/{name}/layer-{layer}.h5", model=name, layer=layer,
                                            d_m=manifest["d_m"])
            cells = []
            for mode in MODES:
                run = runs[name]["as_is" if mode == "exclude_first" else mode]
                K = run.keys[rows_of[mode], layer].astype(np.float64)
                P = matrices.superposition_matrices(K, w.cholesky)["P"]
                cells.append(f"{summaries.excess_kurtosis(matrices.off_diagonal(P)):.1f}")
            lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
