"""Lifelong editing: the closed-form update's interference equals what P predicts, null-space edits spare the
preserved keys, a real edit on the offline model works, and bad edit plans fail clearly."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from conftest import tiny_model
from superposition.settings import rule_settings
from superposition import editing, keys as keys_mod, models
from superposition.facts import Fact


def _random_spd(rng, d, n=None):
    X = rng.standard_normal((n or 4 * d, d))
    return X.T @ X / X.shape[0]


def _capture_keys(model, layer, n_tokens=400, seed=0):
    """Real keys of a tiny model: the input of its down projection over random token sequences."""
    captured = []
    module = models.key_module(model, layer)
    handle = module.register_forward_pre_hook(lambda mod, args: captured.append(args[0].reshape(-1, args[0].shape[-1])))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model(input_ids=torch.randint(0, model.config.vocab_size, (n_tokens // 20, 20), generator=gen))
    handle.remove()
    return torch.cat(captured).double().numpy()


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])  # Conv1D (weight stored transposed) and nn.Linear
def test_predicted_interference_equals_the_measured_change_of_a_real_layer(model_type):
    model = tiny_model(model_type).double()
    layer = 1
    module = models.key_module(model, layer)
    keys = _capture_keys(model, layer)
    C = keys.T @ keys / len(keys)
    L = scipy.linalg.cholesky(C, lower=True)
    rng = np.random.default_rng(1)
    K = keys[rng.choice(len(keys), 12, replace=False)]  # "fact" keys: 12 real keys of this layer
    edit_rows = [3, 7, 0, 9, 3]  # sequential edits, one fact edited twice
    W0 = editing.weight_matrix(module)
    with torch.no_grad():
        before = module(torch.as_tensor(K)).numpy()
    W, deltas = W0.copy(), []
    for row in edit_rows:
        delta = rng.standard_normal(W0.shape[0])
        W = W + editing.closed_form_update(delta, K[row], L)
        editing.set_weight_matrix(module, W)
        deltas.append(delta)
    with torch.no_grad():
        measured = (module(torch.as_tensor(K)).numpy() - before).T  # (d_out, n_keys), through the module itself
    P = editing.pool_p_matrix(K, L)
    predicted = editing.predicted_interference(P[edit_rows], np.array(deltas))
    assert editing.relative_error(predicted, measured) < 1e-8
    # and the float64 master copy agrees with the module's weights
    assert np.allclose(editing.weight_matrix(module), W, rtol=0, atol=1e-12)


def test_a_key_orthogonal_in_whitening_space_is_left_unchanged():
    rng = np.random.default_rng(2)
    d, d_out = 24, 10
    C = _random_spd(rng, d)
    L = scipy.linalg.cholesky(C, lower=True)
    k_edit = rng.standard_normal(d)
    c_inv_k = np.linalg.solve(C, k_edit)
    r = rng.standard_normal(d)
    k_orth = r - (c_inv_k @ r) / (c_inv_k @ k_edit) * k_edit  # k_edit^T C^-1 k_orth = 0
    delta = rng.standard_normal(d_out)
    update = editing.closed_form_update(delta, k_edit, L)
    assert np.linalg.norm(update @ k_orth) < 1e-12 * np.linalg.norm(delta) * np.linalg.norm(k_orth)
    # the edited key gets exactly its delta, and it was not orthogonal in activation space
    assert np.allclose(update @ k_edit, delta, rtol=1e-12, atol=0)
    assert abs(k_edit @ k_orth) / (np.linalg.norm(k_edit) * np.linalg.norm(k_orth)) > 0.01


def test_null_space_update_spares_the_preserved_keys():
    rng = np.random.default_rng(3)
    d, n, d_out = 32, 2000, 8
    scales = np.r_[np.full(24, 1.0), np.full(8, 1e-3)]  # 8 directions the preserved keys hardly use
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0]
    K0 = (rng.standard_normal((n, d)) * scales) @ basis.T
    C = K0.T @ K0 / n
    threshold = 1e-4
    projector, null_dim, _ = editing.null_space_projector(C, threshold)
    assert null_dim == 8
    key, delta = rng.standard_normal(d), rng.standard_normal(d_out)
    update = editing.null_space_update(delta, key, projector, np.zeros((d, d)))
    # mean squared change over the preserved keys = tr(U C U^T) <= threshold * ||U||_F^2
    change = np.einsum("ij,jk,ik->", update, C, update)
    assert change <= threshold * np.linalg.norm(update) ** 2
    # the same update without the projection (P = I) moves the preserved keys far beyond that bound
    unprojected = editing.null_space_update(delta, key, np.eye(d), np.zeros((d, d)))
    assert np.einsum("ij,jk,ik->", unprojected, C, unprojected) > 100 * threshold * np.linalg.norm(unprojected) ** 2
    # AlphaEdit keeps earlier edits' keys in K_p K_p^T so that a later update disturbs them less (a ridge-
    # regularised trade-off, not an exact constraint)
    key2, delta2 = rng.standard_normal(d), rng.standard_normal(d_out)
    keeping = editing.null_space_update(delta2, key2, projector, np.outer(key, key))
    forgetting = editing.null_space_update(delta2, key2, projector, np.zeros((d, d)))
    assert np.linalg.norm(keeping @ key) < 0.2 * np.linalg.norm(forgetting @ key)


def test_counterfactual_objects_are_deterministic_and_missing_ones_are_errors():
    facts = [Fact(1, "{} speaks", "A", "French", "P1"), Fact(2, "{} speaks", "B", "German", "P1"),
             Fact(3, "{} speaks", "C", "Dutch", "P1"), Fact(4, "{} plays", "D", "chess", "P2"),
             Fact(5, "{} plays", "E", "go", "P3", target_new="tennis")]
    # the same relation's other objects, sorted, picked by case_id: case 1 of ["Dutch", "German"]
    assert editing.counterfactual_object(facts[0], facts) == "German"
    assert editing.counterfactual_object(facts[0], facts) == editing.counterfactual_object(facts[0], facts)
    assert editing.counterfactual_object(facts[4], facts) == "tennis"  # CounterFact's own target_new wins
    with pytest.raises(editing.EditingError, match="case_id 4 .*'D'.*P2.*no counterfactual object"):
        editing.counterfactual_object(facts[3], facts)
    # objects whose first token equals the true one's are skipped
    same_start = {"French": 1, "German": 1, "Dutch": 2}
    assert editing.counterfactual_object(facts[0], facts, first_token=same_start.get) == "Dutch"


def test_more_edits_than_known_facts_is_an_error(smollm2):
    _, tokenizer = smollm2
    facts = [Fact(i, "{} speaks", s, t, "P1") for i, (s, t) in enumerate([("A", "French"), ("B", "German")])]
    with pytest.raises(editing.EditingError, match="n_edits is 3 but only 2 known facts are available"):
        editing.plan_edits(facts, facts, 3, tokenizer)
    with pytest.raises(editing.EditingError, match="none is left to measure retention"):
        editing.plan_edits(facts, facts, 2, tokenizer)


def test_one_edit_on_the_offline_model_makes_target_new_the_argmax(smollm2):
    model, tokenizer = smollm2
    layer = 8
    facts = [Fact(0, "{} is located in the city of", "The Eiffel Tower", "Paris", "P131", target_new="Rome"),
             Fact(1, "{} is located in the city of", "Big Ben", "London", "P131"),
             Fact(2, "The mother tongue of {} is", "Vladimir Putin", "Russian", "P103")]
    run = keys_mod.run_prompts(model, tokenizer, facts, layers=[layer], predictions=True)
    assert tokenizer.convert_ids_to_tokens(run.predicted[0]) != tokenizer.convert_ids_to_tokens(
        keys_mod.target_first_token(tokenizer, facts[0].text, "Rome"))
    K = run.keys[:, 0, :].astype(np.float64)
    d_m = K.shape[1]
    L = np.eye(d_m)  # C = I: the update still sets W k_e = v* exactly
    module = models.key_module(model, layer)
    W_before = module.weight.detach().clone()
    defaults = rule_settings({}, "lifelong_edit")  # the schema's defaults
    cfg = editing.EditConfig.from_config({**defaults["editing"], "batch_size": defaults["facts"]["batch_size"],
                                          "n_edits": 1, "eval_every": 1, "value_steps": 40})
    out = editing.run_sequence(model, tokenizer, module, "closed_form", facts[:1], facts[1:], K, [0], [1, 2], L,
                               editing.pool_p_matrix(K, L), None, cfg)
    assert out.final_success.tolist() == [True], out.steps
    assert out.steps[-1]["prediction_rel_error"] < 1e-10
    assert out.key_mismatch < 1e-4  # the key at edit time is the pipeline's key
    assert torch.equal(module.weight, W_before)  # the base weights are restored after the run


@pytest.mark.parametrize("model_type", ["llama", "opt"])  # OPT flattens (batch, seq) before its MLP
def test_value_search_reads_the_key_and_edits_the_subject_token(model_type):
    from conftest import tiny_tokenizer
    from test_models import capture_mlp_input, expected_key

    model, tokenizer = tiny_model(model_type), tiny_tokenizer()
    fact = Fact(0, "{} is a native speaker of", "Vladimir Mayakovsky", "Russian")
    layer, subject_index = 1, 1  # "Mayakovsky"
    module = models.key_module(model, layer)
    result = editing.optimise_value(model, tokenizer, module, fact, "Spanish", steps=20, lr=0.5, weight_decay=0.0,
                                    clamp_norm_factor=100.0, early_stop_nll=0.0)
    ids = torch.as_tensor([tokenizer(fact.text)["input_ids"]])
    seen = {}
    handle = capture_mlp_input(model, layer, seen)
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    want = expected_key(model, layer, seen["x"]).reshape(ids.shape[1], -1)[subject_index]
    np.testing.assert_allclose(result.key, want.double().numpy(), rtol=1e-5, atol=1e-6)

    def target_nll(delta):
        def add(mod, args, output):
            output = output.clone()
            output.reshape(ids.shape[1], -1)[subject_index] += torch.as_tensor(delta, dtype=output.dtype)
            return output

        handle = module.register_forward_hook(add)
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1]
        handle.remove()
        return float(-torch.log_softmax(logits, -1)[tokenizer.convert_tokens_to_ids("Spanish")])

    assert np.linalg.norm(result.delta) > 0
    # the search's own -log p(target) is what its delta gives added at the subject token (up to its last Adam step),
    # below the unedited model's (a random tiny model moves little)
    edited = target_nll(result.delta)
    assert abs(edited - result.nll) < 1e-3
    assert edited < target_nll(np.zeros_like(result.delta)) - 0.01
