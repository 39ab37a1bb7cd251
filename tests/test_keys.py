import numpy as np
import pytest

from superposition import keys, matrices, whitening
from superposition.facts import Fact, FactError


def fact(case_id, prompt, subject, target="x"):
    return Fact(case_id, prompt, subject, target)


FACTS = [
    fact(0, "{} is a native speaker of", "Vladimir Mayakovsky", "Russian"),
    fact(1, "{} is a native speaker of", "Vladimir Bukovsky", "Russian"),
    fact(2, "The capital of {} is", "France", "Paris"),
    fact(3, "{} was developed by", "Mac OS X 10.1", "Apple"),
    fact(4, "{} was developed by", "Windows 8.1", "Microsoft"),
    fact(5, "{} is located in the country of", "University of Washington", "United States"),
    fact(6, "{}, which is located in", "University of Washington", "Seattle"),
    fact(7, "The mother tongue of {} is", "Lionel Messi", "Spanish"),
]


def test_subject_last_index_from_offsets():
    offsets = [(0, 0), (0, 8), (8, 19), (19, 22), (22, 24)]  # <bos> 'Vladimir' ' Mayakovsky' ' is' ' a'
    assert keys.subject_last_index(offsets, (0, 19)) == 2
    assert keys.subject_last_index(offsets, (0, 8)) == 1
    with pytest.raises(FactError, match="case_id 9: the subject .* tokenises to nothing"):
        keys.subject_last_index(offsets, (30, 35), case_id=9)


def test_subject_token_is_the_last_subject_token(smollm2):
    model, tokenizer = smollm2
    run = keys.run_prompts(model, tokenizer, FACTS, layers=[0], predictions=False)
    assert run.token_str[0] == tokenizer.tokenize("Vladimir Mayakovsky")[-1]
    assert run.token_str[2] == "ĠFrance"
    assert run.token_str[4] == tokenizer.tokenize("Windows 8.1")[-1]


def test_padding_and_batch_size_do_not_change_keys(smollm2):
    model, tokenizer = smollm2
    layers = [0, 7, 29]
    # one left-padded batch holding every prompt twice, beside each prompt alone
    batched = keys.run_prompts(model, tokenizer, FACTS * 2, layers=layers, predictions=True, batch_size=64)
    single = keys.run_prompts(model, tokenizer, FACTS, layers=layers, predictions=True, batch_size=1)
    left = keys.run_prompts(model, tokenizer, FACTS, layers=layers, predictions=True, batch_size=64,
                            padding_side="left")
    right = keys.run_prompts(model, tokenizer, FACTS, layers=layers, predictions=True, batch_size=64,
                             padding_side="right")
    n = len(FACTS)

    def rel(a, b):  # per fact and layer: |a - b| / |b| of the key vector
        return (np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)).max()

    assert rel(batched.keys[:n], single.keys) <= 1e-5
    assert rel(batched.keys[-n:], single.keys) <= 1e-5
    assert rel(left.keys, single.keys) <= 1e-5
    assert rel(right.keys, single.keys) <= 1e-5
    assert batched.predicted[:n] == single.predicted == left.predicted == right.predicted
    assert max(abs(a - b) for a, b in zip(left.margin, right.margin)) < 1e-4


def test_same_subject_at_prompt_start_gives_identical_keys_and_p_one(smollm2):
    """The paper's "University of Washington" pair: both prompts begin with the subject."""
    model, tokenizer = smollm2
    run = keys.run_prompts(model, tokenizer, FACTS, layers=[0, 15], predictions=False, batch_size=1)
    assert np.array_equal(run.keys[5], run.keys[6])
    rng = np.random.default_rng(0)
    d = run.keys.shape[-1]
    A = rng.standard_normal((d, 64))
    w = whitening.whiten(A @ A.T / 64 + np.eye(d))  # a dense, well-conditioned C
    P = matrices.superposition_matrices(run.keys[:, 0].astype(np.float64), w.cholesky)["P"]
    assert P[5, 6] == 1.0 and P[6, 5] == 1.0


def test_subject_missing_from_prompt_is_an_error(smollm2):
    model, tokenizer = smollm2
    bad = Fact(42, "The capital of France is", "Germany", "Paris")  # no '{}': subject never inserted
    with pytest.raises(FactError, match="case_id 42"):
        keys.run_prompts(model, tokenizer, [bad], layers=[0])


def test_context_templates_average_the_key(smollm2):
    model, tokenizer = smollm2
    plain = keys.run_prompts(model, tokenizer, FACTS[:2], layers=[3], predictions=False)
    pre = keys.run_prompts(model, tokenizer, FACTS[:2], layers=[3], predictions=False,
                           context_templates=["A fact. {}"])
    both = keys.run_prompts(model, tokenizer, FACTS[:2], layers=[3], predictions=False,
                            context_templates=["{}", "A fact. {}"])
    np.testing.assert_allclose(both.keys, (plain.keys + pre.keys) / 2, rtol=1e-5, atol=1e-6)


def test_target_first_token(smollm2):
    _, tokenizer = smollm2
    tid = keys.target_first_token(tokenizer, "The capital of France is", "Paris")
    assert tokenizer.convert_ids_to_tokens(tid) == "ĠParis"


FIRST = [fact(20, "{} is located in the continent of", "Paris", "Europe"),  # one token, at the start
         fact(21, "{} is located in the continent of", "Vladimir Mayakovsky", "Europe"),  # starts, ends later
         fact(22, "The capital of {} is", "France", "Paris")]


def test_a_single_token_subject_that_starts_the_prompt_is_flagged(smollm2):
    model, tokenizer = smollm2
    run = keys.run_prompts(model, tokenizer, FIRST, layers=[24], predictions=False)
    assert run.first_position == [True, False, False]
    assert run.token_index[0] == 0 and run.token_index[1] > 0
    # the attention sink: the first-position key is far shorter than the others at a late layer
    norms = np.linalg.norm(run.keys[:, 0], axis=1)
    assert norms[0] < 0.25 * min(norms[1:]), norms


def test_bos_moves_every_subject_index_by_one_and_is_refused_without_a_bos(smollm2):
    model, tokenizer = smollm2
    assert tokenizer.bos_token_id is not None and not getattr(tokenizer, "add_bos_token", False)
    plain = keys.run_prompts(model, tokenizer, FIRST, layers=[24], predictions=False)
    bos = keys.run_prompts(model, tokenizer, FIRST, layers=[24], predictions=False, prepend_bos=True)
    assert bos.token_index == [i + 1 for i in plain.token_index]
    assert bos.token_str == plain.token_str
    assert bos.first_position == [True, False, False]  # first after the special token, but no longer position 0
    norms = np.linalg.norm(bos.keys[:, 0], axis=1)
    assert norms[0] > 0.25 * min(norms[1:]), norms

    class NoBos:
        bos_token_id = None

        def __call__(self, *args, **kwargs):
            return tokenizer(*args, **kwargs)

    with pytest.raises(FactError, match="facts.prompt_mode is 'bos' but the tokenizer of this model .* has no BOS"):
        keys.run_prompts(model, NoBos(), FIRST, layers=[24], predictions=False, prepend_bos=True)


def test_prompt_rows_place_each_fact_in_each_template_with_the_bare_prompt_first_for_predictions():
    facts = FACTS[2:4]
    rows = keys.prompt_rows(facts, ["A fact. {}"], predictions=True)
    assert rows.texts == ["The capital of France is", "A fact. The capital of France is",
                          "Mac OS X 10.1 was developed by", "A fact. Mac OS X 10.1 was developed by"]
    assert [t[a:b] for t, (a, b) in zip(rows.texts, rows.spans)] == ["France"] * 2 + ["Mac OS X 10.1"] * 2
    assert rows.fact_index == [0, 0, 1, 1] and rows.first_rows == [0, 2]
    assert (rows.n_templates, rows.key_templates) == (2, [1])  # the bare prompt predicts, the template keys
    assert keys.prompt_rows(facts, ["A fact. {}"], predictions=False).key_templates == [0]
    assert keys.prompt_rows(facts, ["{}", "A fact. {}"], predictions=True).key_templates == [0, 1]
    with pytest.raises(ValueError, match="must contain exactly one"):
        keys.prompt_rows(facts, ["{} and {}"], predictions=False)


def test_per_fact_averages_the_key_templates_in_float64():
    import torch

    rows = keys.prompt_rows(FACTS[:2], ["{}", "A {}", "B {}"], predictions=False)
    rng = np.random.default_rng(0)
    batches = [torch.as_tensor(rng.standard_normal((4, 5)), dtype=torch.float32),
               torch.as_tensor(rng.standard_normal((2, 5)), dtype=torch.float32)]  # 6 rows in two batches
    captured = {7: batches, 9: [2 * b for b in batches]}
    got = keys.per_fact(captured, [7, 9], rows)
    flat = torch.cat(batches).numpy().astype(np.float64).reshape(2, 3, 5)
    assert got.dtype == np.float32 and got.shape == (2, 2, 5)
    np.testing.assert_array_equal(got[:, 0], flat.mean(axis=1).astype(np.float32))
    np.testing.assert_array_equal(got[:, 1], (2 * flat).mean(axis=1).astype(np.float32))
    one = keys.prompt_rows(FACTS[:3], ["A {}"], predictions=True)  # bare prompt + one key template: no mean
    single = keys.per_fact({0: [torch.arange(6.0).reshape(6, 1)]}, [0], one)
    assert single[:, 0, 0].tolist() == [1.0, 3.0, 5.0]


def test_leading_special_tokens_are_the_empty_offsets():
    assert keys.leading_special_tokens([(0, 0), (0, 5), (5, 8)]) == 1
    assert keys.leading_special_tokens([(0, 5), (5, 8)]) == 0


@pytest.mark.parametrize("model_type", ["llama", "phi3", "opt", "gemma3"])
def test_prompt_keys_are_the_subject_tokens_mlp_keys_in_tiny_models(model_type):
    """run_prompts' batched, padded keys equal the key recomputed from the weights for each prompt alone, at the
    subject's last token, for families whose blocks differ (fused gate_up_proj, OPT's flattened tokens, gemma3's
    language model under a vision-language model)."""
    import torch

    from conftest import tiny_model, tiny_tokenizer
    from test_models import capture_mlp_input, expected_key

    model, tokenizer = tiny_model(model_type), tiny_tokenizer()
    facts = [FACTS[0], FACTS[2], FACTS[5], FACTS[7]]
    layers = [0, 2]
    right = keys.run_prompts(model, tokenizer, facts, layers=layers, predictions=False, batch_size=4)
    left = keys.run_prompts(model, tokenizer, facts, layers=layers, predictions=True, batch_size=4)
    assert right.token_index == left.token_index == [1, 3, 2, 5]
    for i, f in enumerate(facts):
        ids = tokenizer(f.text)["input_ids"]
        for j, layer in enumerate(layers):
            seen = {}
            handle = capture_mlp_input(model, layer, seen)
            with torch.no_grad():
                model(input_ids=torch.as_tensor([ids]))
            handle.remove()
            want = expected_key(model, layer, seen["x"]).reshape(len(ids), -1)[right.token_index[i]].numpy()
            np.testing.assert_allclose(right.keys[i, j], want, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(left.keys[i, j], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "opt", "gpt2"])  # nn.Linear, OPT's flattened tokens, Conv1D
def test_module_outputs_and_final_hidden_come_from_the_same_forward(model_type):
    """The down projection's output at the key's token and the last block's output at the prompt's last token,
    captured in the batched, left-padded prediction pass, equal those of each prompt run alone; asking for them
    changes neither keys nor predictions; and for Llama the final norm and LM head applied to the captured hidden
    state give the run's own target probability."""
    import torch

    from conftest import tiny_model, tiny_tokenizer
    from superposition.models import blocks, key_module

    model, tokenizer = tiny_model(model_type), tiny_tokenizer()
    facts = [FACTS[0], FACTS[2], FACTS[5], FACTS[7]]
    layer = 1
    plain = keys.run_prompts(model, tokenizer, facts, layers=[layer], predictions=True, batch_size=4)
    run = keys.run_prompts(model, tokenizer, facts, layers=[layer], predictions=True, batch_size=4,
                           module_outputs=True, final_hidden=True)
    assert plain.outputs is None and plain.final_hidden is None
    np.testing.assert_array_equal(run.keys, plain.keys)
    assert (run.predicted, run.target_prob) == (plain.predicted, plain.target_prob)
    assert run.outputs.shape[:2] == (4, 1) and run.final_hidden.shape == (4, model.config.hidden_size)
    module, last_block = key_module(model, layer), blocks(model)[-1]
    for i, f in enumerate(facts):
        ids = tokenizer(f.text)["input_ids"]
        seen = {}
        handles = [module.register_forward_hook(lambda m, a, o: seen.__setitem__("out", o)),
                   last_block.register_forward_hook(
                       lambda m, a, o: seen.__setitem__("h", o[0] if isinstance(o, tuple) else o))]
        with torch.no_grad():
            model(input_ids=torch.as_tensor([ids]))
        for handle in handles:
            handle.remove()
        want_out = seen["out"].reshape(len(ids), -1)[run.token_index[i]].numpy()
        np.testing.assert_allclose(run.outputs[i, 0], want_out, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(run.final_hidden[i], seen["h"].reshape(len(ids), -1)[-1].numpy(),
                                   rtol=1e-4, atol=1e-5)
        assert np.linalg.norm(want_out) > 0
    if model_type == "llama":
        with torch.no_grad():
            logits = model.lm_head(model.model.norm(torch.as_tensor(run.final_hidden))).double()
        prob = torch.softmax(logits, -1)[torch.arange(4), torch.as_tensor(run.target)].numpy()
        np.testing.assert_allclose(prob, run.target_prob, rtol=1e-4)
