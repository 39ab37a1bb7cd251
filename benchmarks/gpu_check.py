"""The GPU path, measured: correctness on CUDA against a float64 reference, throughput, the Gram's precision
trade-off, and the paper rebuild's GPU-hours from the measured speed (run by hand; not a test).

Everything runs on seeded, randomly initialised models of the real shapes (the same FLOPs as the trained ones;
no download) and random token ids. One call, results as JSON and a markdown table in --out, the table printed
last. ``--tiny`` shrinks every size so the whole script runs on a CPU in a minute (tests/test_gpu_check.py):

    .venv/bin/python benchmarks/gpu_check.py --out benchmarks/out/gpu --tiny          # CPU, smoke
    benchmarks/gpu_check.sh benchmarks/out/gpu                                         # the GPU machine

Sections:
  1. correctness: per family (tiny configs) and a SmolLM2-135M-shaped Llama, C from one all-layer pass in float32
     with TF32 off against the same model in float64 (same tokens, same device); the same with bf16 weights and
     with TF32 on; keys and P on the device against the CPU; padding/batch invariance of the keys on the device.
  2. throughput: our single pass vs a ROME-style pass per layer vs a bare forward (SmolLM2 and GPT-2-small
     shapes, float32); a Llama-2-7B shape in bf16 with all 32 layers (ours and bare; ROME-style from timed
     truncated passes at a few depths, fitted linearly in the depth); tokens/s, peak memory, and forward + Gram
     against the measured bf16 and fp32 GEMM peaks.
  3. Gram precision: float32, TF32, float32 emulated by three bf16 products (k = hi + lo), and float64; time and
     the error of C and of P against float64.
  4. GPU-hours of the statistics stage for config/paper.yaml at 100,000 articles, scaled from the measured
     tokens/s by FLOPs (which numbers were measured and which scaled is said in the table).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Iterator
from unittest import mock

import numpy as np
import torch

from superposition import keys as keys_mod
from superposition import matrices, models, stats
from superposition.whitening import whiten

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------- models


def config_of(kind: str, tiny: bool, vocab: int):
    import transformers as tf

    if kind == "smollm2":  # SmolLM2-135M
        if tiny:
            return tf.LlamaConfig(vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
        return tf.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                              num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                              tie_word_embeddings=True)
    if kind == "gpt2":  # GPT-2 small (Conv1D)
        if tiny:
            return tf.GPT2Config(vocab_size=vocab, n_embd=48, n_layer=4, n_head=4, n_positions=512)
        return tf.GPT2Config(vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024)
    if kind == "llama2_7b":
        if tiny:
            return tf.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=176, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
        return tf.LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                              num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    raise ValueError(kind)


def family_config(family: str, vocab: int):
    import transformers as tf

    common = dict(vocab_size=vocab)
    if family == "gpt2":
        return tf.GPT2Config(n_positions=512, n_embd=32, n_layer=3, n_head=4, **common)
    if family == "gptj":
        return tf.GPTJConfig(n_positions=512, n_embd=32, n_layer=3, n_head=4, rotary_dim=4, **common)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                                max_position_embeddings=512, **common)
    if family == "llama":
        return tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=512, **common)
    if family == "gemma3_text":
        return tf.Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=8, max_position_embeddings=512, sliding_window=16,
                                   **common)
    raise ValueError(family)


def build(config, device, dtype=torch.float32, seed=0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype if dtype in (torch.float32, torch.float64) else torch.float32)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, attn_implementation="eager"
                                                     if config.model_type == "gptj" else None)
    finally:
        torch.set_default_dtype(previous)
    return model.to(dtype).eval().requires_grad_(False)


def random_docs(n_docs: int, max_len: int, vocab: int, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=int(rng.integers(max_len // 2, max_len + 1)), dtype=np.int32)
            for _ in range(n_docs)]


def a_tokenizer():
    """A small fast tokenizer with character offsets, trained here on the probe facts (no download)."""
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from superposition.facts import load_facts

    facts, _ = load_facts({"source": "probe"})
    texts = [f.text + " " + f.target_true for f in facts]
    tok = Tokenizer(tok_models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1000, special_tokens=["[PAD]", "[UNK]", "[BOS]"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]")
    return fast, facts


# ------------------------------------------------------------------------------------- 1. correctness


def second_moments(model, docs, gram_dtype="float32", allow_tf32=False, max_tokens=4096) -> dict:
    """The pipeline's statistics (collect_second_moments, every layer in one pass), read back from its file."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "stats.h5"
        summary = stats.collect_second_moments(model, docs, list(range(len(models.blocks(model)))), path,
                                               {"model": "check"}, pad_id=0, progress=False,
                                               options=stats.StatsOptions.from_config(
                                                   max_tokens=max_tokens, gram_dtype=gram_dtype, allow_tf32=allow_tf32))
        summary["sums"] = stats.shard_sums(path)[0]
    stats.set_matmul_precision(False)
    return summary


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def correctness(device: str, tiny: bool) -> Iterator[dict]:
    tokenizer, facts = a_tokenizer()
    vocab = len(tokenizer)
    cases = [(f, family_config(f, vocab)) for f in ("gpt2", "gptj", "gpt_neox", "llama", "gemma3_text")]
    cases.append(("smollm2-shape", config_of("smollm2", tiny, vocab)))
    for name, config in cases:
        yield guarded({"model": name}, device, lambda: correctness_case(device, tiny, config, tokenizer, facts))


def correctness_case(device: str, tiny: bool, config, tokenizer, facts) -> dict:
    n_docs, max_len = (12, 40) if tiny else (64, 512)
    vocab = len(tokenizer)
    config.vocab_size = vocab
    docs = random_docs(n_docs, max_len, vocab)
    # one set of weights: the float32 model, and copies of it in float64 (the reference) and bf16
    model = build(config, device, torch.float32)
    ref_model = copy.deepcopy(model).double()
    ref = second_moments(ref_model, docs, gram_dtype="float64")
    C_ref = {l: s / ref["n_tokens"] for l, s in ref["sums"].items()}
    del ref_model
    row = {"layers": len(C_ref), "tokens": ref["n_tokens"]}
    for label, kw, m in (("fp32", {}, model), ("tf32", {"allow_tf32": True}, model)):
        got = second_moments(m, docs, **kw)
        row[f"C_rel_err_{label}"] = max(rel(got["sums"][l] / got["n_tokens"], C_ref[l]) for l in C_ref)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    got = second_moments(bf16, docs)
    row["C_rel_err_bf16_weights"] = max(rel(got["sums"][l] / got["n_tokens"], C_ref[l]) for l in C_ref)
    del bf16
    # keys and P on the device against the CPU, and padding / batch invariance on the device
    probe = facts[:48]
    on_device = keys_mod.run_prompts(model, tokenizer, probe, layers=None, predictions=False, batch_size=16)
    single = keys_mod.run_prompts(model, tokenizer, probe, layers=None, predictions=False, batch_size=1)
    cpu_model = copy.deepcopy(model).to("cpu")
    on_cpu = keys_mod.run_prompts(cpu_model, tokenizer, probe, layers=None, predictions=False, batch_size=16)
    row["keys_rel_err_vs_cpu"] = max(rel(on_device.keys[:, l], on_cpu.keys[:, l]) for l in C_ref)
    row["keys_rel_err_batch1_vs_16"] = max(rel(single.keys[:, l], on_device.keys[:, l]) for l in C_ref)
    last = max(C_ref)
    L = whiten(C_ref[last], ridge=1e-6 * np.trace(C_ref[last]) / len(C_ref[last])).cholesky
    P_dev = matrices.superposition_matrices(on_device.keys[:, last].astype(np.float64), L)["P"]
    P_cpu = matrices.superposition_matrices(on_cpu.keys[:, last].astype(np.float64), L)["P"]
    row["P_max_abs_err_vs_cpu"] = float(np.abs(P_dev - P_cpu).max())
    del model, cpu_model
    return row


DEADLINE = float("inf")  # perf_counter() after which no case starts (--budget)


def guarded(head: dict, device: str, measure: Callable[[], dict]) -> dict:
    """One case's row; an exception becomes the row's error (the GPU lease is too short to stop at the first one)."""
    t0 = time.perf_counter()
    if t0 > DEADLINE:
        return {**head, "error": "skipped: the --budget seconds were spent"}
    try:
        row = {**head, **measure()}
    except Exception as error:  # noqa: BLE001 - reported in the table, the run goes on
        row = {**head, "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-4000:]}
        print(row["traceback"], file=sys.stderr, flush=True)
    empty_cache(device)
    row["case_seconds"] = time.perf_counter() - t0
    print(json.dumps({k: v for k, v in row.items() if k != "traceback"}, default=float), flush=True)
    return row


def empty_cache(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# -------------------------------------------------------------------------------------- 2. throughput


def padded_batches(docs, device, max_tokens):
    plan = stats.token_batches([len(d) for d in docs], max_tokens, 64, stats.default_batch_overhead(
        "cuda" if device.startswith("cuda") else "cpu"))
    return [stats.pad_batch([docs[i] for i in b], 0) for b in plan]


def timed(device, fn):
    gc.collect()  # nothing of the last pass stays allocated in the next one (a cycle once kept 31 GB of sums)
    empty_cache(device)
    sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    return seconds, peak, out


def one_pass(model, batches, layers, gram_dtype="float32"):
    acc = stats.GramAccumulator(model, layers, gram_dtype)
    with acc:
        for index, (ids, mask, pos) in enumerate(batches):
            acc.add_batch(ids, mask, pos, index)
        acc.flush()
    return acc.count


def bare(model, batches, device):
    with torch.inference_mode():
        for ids, mask, pos in batches:
            model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                             use_cache=False)


def useful_flops(model, docs, d_m, n_layers, gram_layers=None):
    block_params = sum(p.numel() for p in models.blocks(model).parameters() if p.dim() == 2)
    d_model = model.config.hidden_size
    tokens = sum(len(d) for d in docs)
    attention = sum(4 * n_layers * d_model * (len(d) * (len(d) + 1) / 2) for d in docs)
    forward = 2 * block_params * tokens + attention
    gram = (gram_layers if gram_layers is not None else n_layers) * d_m * d_m * tokens
    return forward, gram


def gemm_peak(device, dtype, n):
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(3):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(5):
            a @ b
        sync(device)
        best = max(best, 5 * 2 * n**3 / (time.perf_counter() - t0))
    return best


def gemm_peaks(device: str, tiny: bool) -> dict:
    stats.set_matmul_precision(False)
    n = 512 if tiny else 8192
    return {"fp32": gemm_peak(device, torch.float32, n),
            "bf16": gemm_peak(device, torch.bfloat16, n) if device != "cpu" or tiny else float("nan")}


def throughput(device: str, tiny: bool, peaks: dict, shapes=None) -> Iterator[dict]:
    stats.set_matmul_precision(False)
    for kind, dtype, tokens in (("smollm2", torch.float32, 2_000 if tiny else 400_000),
                                ("gpt2", torch.float32, 2_000 if tiny else 400_000),
                                ("gpt2", torch.bfloat16, 2_000 if tiny else 400_000),  # config/paper.yaml's dtype
                                ("llama2_7b", torch.bfloat16, 2_000 if tiny else 120_000)):
        if shapes and kind not in shapes:
            continue
        yield guarded({"shape": kind, "dtype": str(dtype).replace("torch.", "")}, device,
                      lambda: throughput_case(device, tiny, peaks, kind, dtype, tokens))


def throughput_case(device: str, tiny: bool, peaks: dict, kind: str, dtype, tokens: int) -> dict:
    config = config_of(kind, tiny, 1000)
    model = build(config, device, dtype)
    n_layers = config.num_hidden_layers
    d_m = models.key_width(models.key_module(model, 0))
    max_len = 256 if tiny else 1024
    docs = random_docs(max(2, tokens // (max_len * 3 // 4)), max_len, config.vocab_size, seed=2)
    batches = padded_batches(docs, device, 4096 if tiny else 16384)
    n_tokens = sum(len(d) for d in docs)
    row = {"layers": n_layers, "d_m": d_m, "tokens": n_tokens}
    everything = list(range(n_layers))
    one_pass(model, batches[:1], everything)  # warm-up: every layer's kernels chosen once
    ours_s, ours_peak, _ = timed(device, lambda: one_pass(model, batches, everything))
    bare_s, bare_peak, _ = timed(device, lambda: bare(model, batches, device))
    if kind != "llama2_7b":
        rome_s, rome_peak, _ = timed(device, lambda: [one_pass(model, batches, [l]) for l in range(n_layers)])
        row["rome_note"] = "measured"
    else:
        # one truncated pass per layer: time passes that stop at a few depths, fit t(depth) = a + b*depth
        depths = sorted({1, max(1, n_layers // 4), max(1, n_layers // 2), n_layers})
        times = [timed(device, lambda d=d: one_pass(model, batches, [d - 1]))[0] for d in depths]
        b, a = np.polyfit(depths, times, 1)
        rome_s = float(sum(a + b * d for d in range(1, n_layers + 1)))
        rome_peak = float("nan")
        row["rome_note"] = f"fitted from passes to depths {depths}: {[round(t, 3) for t in times]} s"
    if kind != "gpt2":
        # the Gram's layout on this device, each against the default (same tokens, same pass): the pending keys
        # transposed in 128-row tiles (the CPU's) or whole chunks, the whole product in one GEMM instead of panels
        # of GRAM_PANEL rows; and the TF32 products (stats.allow_tf32, the user's trade-off: error in section 1)
        for name, attribute, value in (("tiled_transpose", "TRANSPOSE_ROWS", (128, 128)),
                                       ("whole_transpose", "TRANSPOSE_ROWS", (None, None)),
                                       ("one_panel", "GRAM_PANEL", (1 << 30, 1 << 30))):
            with mock.patch.object(stats, attribute, value):
                row[f"{name}_s"] = timed(device, lambda: one_pass(model, batches, everything))[0]
        stats.set_matmul_precision(True)
        try:
            row["tf32_s"] = timed(device, lambda: one_pass(model, batches, everything))[0]
        finally:
            stats.set_matmul_precision(False)
    forward, gram = useful_flops(model, docs, d_m, n_layers)
    forward_peak = peaks["bf16"] if dtype == torch.bfloat16 else peaks["fp32"]
    ideal = forward / forward_peak + gram / peaks["fp32"]
    row.update(ours_s=ours_s, bare_s=bare_s, rome_s=rome_s, ours_tokens_per_s=n_tokens / ours_s,
               rome_tokens_per_s=n_tokens / rome_s, bare_tokens_per_s=n_tokens / bare_s, rome_over_ours=rome_s / ours_s,
               ours_over_bare=ours_s / bare_s, ours_peak_gib=ours_peak, bare_peak_gib=bare_peak,
               rome_peak_gib=rome_peak, fraction_of_ideal_time=ideal / ours_s, forward_flops=forward, gram_flops=gram)
    del model
    return row


# ------------------------------------------------------------------------------------ 3. Gram precision


def split_bf16_gram(K: torch.Tensor) -> tuple[torch.Tensor, str]:
    """K^T K (K: n x d float32) from three bf16 products with float32 outputs: hi hi^T + hi lo^T + lo hi^T."""
    hi = K.to(torch.bfloat16)
    lo = (K - hi.float()).to(torch.bfloat16)
    try:
        mm = lambda a, b: torch.mm(a, b, out_dtype=torch.float32)  # noqa: E731
        G = mm(hi.T, hi)
        how = "bf16 GEMMs with float32 output"
    except (RuntimeError, TypeError, NotImplementedError):
        mm = lambda a, b: torch.mm(a.float(), b.float())  # noqa: E731
        G = mm(hi.T, hi)
        how = "emulated in float32 (no bf16 GEMM with float32 output on this device): accuracy only, not speed"
    cross = mm(hi.T, lo)
    return G + cross + cross.T, how


def gram_precision(device: str, tiny: bool) -> Iterator[dict]:
    n, d = (4096, 256) if tiny else (65536, 4096)
    gen = torch.Generator(device="cpu").manual_seed(3)
    # heavy-tailed keys with a spread spectrum, like down-projection inputs
    scales = torch.logspace(0, -3, d)
    K = (torch.randn(n, d, generator=gen) * scales).pow(3).to(device)
    keys = torch.randn(128, d, generator=gen).double() * scales.double()
    K64 = K.double()
    ref = (K64.T @ K64).cpu().numpy() / n
    L = whiten(ref, ridge=1e-8 * np.trace(ref) / d).cholesky
    P_ref = matrices.superposition_matrices(keys.numpy(), L)["P"]
    for method in ("float32", "tf32", "split_bf16", "float64"):
        yield guarded({"method": method}, device, lambda: gram_case(device, method, K, K64, keys, ref, P_ref))
    stats.set_matmul_precision(False)


def gram_case(device, method, K, K64, keys, ref, P_ref) -> dict:
    n, d = K.shape
    stats.set_matmul_precision(method == "tf32")

    def gram():
        if method == "float64":
            return K64.T @ K64, "float64 GEMM"
        if method == "split_bf16":
            return split_bf16_gram(K)
        return K.T @ K, f"{method} GEMM"

    try:
        gram()  # warm-up
        seconds, _, (G, how) = timed(device, gram)
    finally:
        stats.set_matmul_precision(False)
    C = G.double().cpu().numpy() / n
    P = matrices.superposition_matrices(keys.numpy(), np.linalg.cholesky(C + 1e-8 * np.trace(ref) / d * np.eye(d)))["P"]
    return {"how": how, "seconds": seconds, "C_rel_err": rel(C, ref), "P_max_abs_err": float(np.abs(P - P_ref).max()),
            "n": n, "d": d}


# ------------------------------------------------------------------------------------ 4. paper GPU-hours


def paper_hours(rows: list[dict], tokens_per_article: float) -> list[dict]:
    """Hours of the statistics stage per paper model (config/paper.yaml: bf16 weights, float32 Gram), scaled from
    the measured bf16 rows with two rates: the forward's FLOP/s from the bare forward's time, the Gram's from
    (ours - bare) seconds; GPT-2 models from the GPT-2-small row, the others from the Llama-2-7B row. Forward FLOPs
    are 2 x parameters per token (embeddings included: a slight overcount), the Gram's d_m^2 per token and layer."""
    import yaml

    paper = yaml.safe_load((REPO / "config/paper.yaml").read_text())
    n_docs = paper["corpus"]["n_documents"]
    shapes = {
        "gpt2": (768, 3072, 12), "gpt2-medium": (1024, 4096, 24), "gpt2-large": (1280, 5120, 36),
        "pythia-1b": (2048, 8192, 16), "pythia-2.8b": (2560, 10240, 32), "pythia-6.9b": (4096, 16384, 32),
        "gpt-j-6b": (4096, 16384, 28), "llama-2-7b": (4096, 11008, 32), "llama-2-13b": (5120, 13824, 40),
        "llama-3-8b": (4096, 14336, 32), "llama-3.1-8b": (4096, 14336, 32),
    }
    measured = {r["shape"]: r for r in rows if "error" not in r and r["dtype"] == "bfloat16"}
    out = []
    for name, entry in paper["models"].items():
        d_model, d_m, n_layers = shapes[name]
        ref = measured.get("gpt2" if name.startswith("gpt2") else "llama2_7b")
        if ref is None:  # its measurement failed: reported in the throughput table
            continue
        forward_rate = ref["forward_flops"] / ref["bare_s"]
        gram_rate = ref["gram_flops"] / max(ref["ours_s"] - ref["bare_s"], 1e-9)
        tokens = n_docs * tokens_per_article
        forward = 2 * entry["params_millions"] * 1e6 * tokens
        gram = n_layers * d_m * d_m * tokens
        out.append({"model": name, "d_m": d_m, "layers": n_layers, "scaled_from": ref["shape"],
                    "forward_hours": forward / forward_rate / 3600, "gram_hours": gram / gram_rate / 3600,
                    "hours": (forward / forward_rate + gram / gram_rate) / 3600})
    return out


# ----------------------------------------------------------------------------------------------- main


def markdown(result: dict) -> str:
    lines = [f"GPU check, {result['date']}, {result['device_name']}, torch {result['torch']}, "
             f"transformers {result['transformers']}{' (tiny sizes)' if result['tiny'] else ''}", ""]
    lines += ["| model | C err fp32 | C err TF32 | C err bf16 weights | keys vs CPU | keys batch 1 vs 16 | P vs CPU |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["correctness"]:
        if "error" in r:
            lines.append(f"| {r['model']} | error: {r['error'][:200]} | | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['C_rel_err_fp32']:.1e} | {r['C_rel_err_tf32']:.1e} | "
                     f"{r.get('C_rel_err_bf16_weights', float('nan')):.1e} | {r['keys_rel_err_vs_cpu']:.1e} | "
                     f"{r['keys_rel_err_batch1_vs_16']:.1e} | {r['P_max_abs_err_vs_cpu']:.1e} |")
    p = result["peaks"]
    lines += ["", f"GEMM peaks: fp32 {p['fp32'] / 1e12:.1f} TFLOP/s, bf16 {p['bf16'] / 1e12:.1f} TFLOP/s", "",
              "| shape | dtype | tokens | ours tok/s | ROME-style tok/s | bare tok/s | ROME/ours | ours/bare | "
              "peak GiB (ours) | of ideal time | tiled transpose / ours | whole transpose / ours | one panel / ours "
              "| TF32 / ours |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["throughput"]:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['dtype']} | error: {r['error'][:200]} |" + " |" * 11)
            continue
        variants = " | ".join(f"{r[k] / r['ours_s']:.2f}" if k in r else "" for k in (
            "tiled_transpose_s", "whole_transpose_s", "one_panel_s", "tf32_s"))
        lines.append(f"| {r['shape']} | {r['dtype']} | {r['tokens']} | {r['ours_tokens_per_s']:.0f} | "
                     f"{r['rome_tokens_per_s']:.0f} | {r['bare_tokens_per_s']:.0f} | {r['rome_over_ours']:.2f} | "
                     f"{r['ours_over_bare']:.2f} | {r['ours_peak_gib']:.1f} | {r['fraction_of_ideal_time']:.0%} | "
                     f"{variants} |")
    lines += ["", "| Gram | seconds | C rel err | P max abs err | how |", "|---|---:|---:|---:|---|"]
    for r in result["gram_precision"]:
        if "error" in r:
            lines.append(f"| {r['method']} | error: {r['error'][:200]} | | | |")
            continue
        lines.append(f"| {r['method']} | {r['seconds']:.4f} | {r['C_rel_err']:.1e} | {r['P_max_abs_err']:.1e} | "
                     f"{r['how']} |")
    lines += ["", "| paper model | d_m | layers | forward h | Gram h | GPU hours (scaled) | scaled from |",
              "|---|---:|---:|---:|---:|---:|---|"]
    for r in result["paper_hours"]:
        lines.append(f"| {r['model']} | {r['d_m']} | {r['layers']} | {r['forward_hours']:.2f} | "
                     f"{r['gram_hours']:.2f} | {r['hours']:.1f} | {r['scaled_from']} |")
    total = sum(r["hours"] for r in result["paper_hours"])
    lines.append(f"| **total** | | | | | **{total:.1f}** | |")
    for e in result["errors"]:
        lines.append(f"section {e['section']} failed: {e['error'][:300]}")
    if result["tiny"]:
        lines.append("(tiny sizes: every number above is a smoke test of the code paths, not a measurement)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: a CPU smoke run of every code path")
    parser.add_argument("--tokens-per-article", type=float, default=700.0, help="for the paper's GPU-hours")
    parser.add_argument("--sections", nargs="*", default=["correctness", "gram_precision", "throughput"],
                        choices=["correctness", "gram_precision", "throughput"])
    parser.add_argument("--shapes", nargs="*", choices=["smollm2", "gpt2", "llama2_7b"],
                        help="throughput: only these shapes (default: all)")
    parser.add_argument("--budget", type=float, default=float("inf"),
                        help="seconds after which no further case starts (the rest are reported as skipped)")
    args = parser.parse_args()
    import transformers

    global DEADLINE
    DEADLINE = time.perf_counter() + args.budget

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "tiny": args.tiny, "device": args.device,
              "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor()
              or "cpu", "torch": torch.__version__, "transformers": transformers.__version__,
              "correctness": [], "throughput": [], "peaks": {"fp32": float("nan"), "bf16": float("nan")},
              "gram_precision": [], "paper_hours": [], "errors": []}
    started = time.perf_counter()

    def save():  # after every row: a run stopped at its time limit still leaves what it measured
        (out / "gpu_check.json").write_text(json.dumps(result, indent=1, default=float))

    for section in args.sections:
        t0 = time.perf_counter()
        try:
            if section == "throughput":
                result["peaks"] = gemm_peaks(args.device, args.tiny)
                rows = throughput(args.device, args.tiny, result["peaks"], args.shapes)
            else:
                rows = {"correctness": correctness, "gram_precision": gram_precision}[section](args.device, args.tiny)
            for row in rows:
                result[section].append(row)
                save()
            if section == "throughput":
                result["paper_hours"] = paper_hours(result["throughput"], args.tokens_per_article)
        except Exception as error:  # noqa: BLE001 - the other sections still run
            result["errors"].append({"section": section, "error": f"{type(error).__name__}: {error}",
                                     "traceback": traceback.format_exc()[-4000:]})
            print(result["errors"][-1]["traceback"], file=sys.stderr, flush=True)
        result[f"{section}_seconds"] = time.perf_counter() - t0
        save()
    result["seconds"] = time.perf_counter() - started
    table = markdown(result)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1, default=float))
    (out / "gpu_check.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
