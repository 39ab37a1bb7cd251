"""Lifelong editing: the closed-form update's interference equals what P predicts (algebraically and measured in a
real forward pass), null-space edits spare the preserved keys, the control leaves the constrained keys exactly
unchanged, a real edit on the offline model works, and bad edit plans fail clearly."""

from __future__ import annotations

import re

import numpy as np
import pytest
import scipy.linalg
import torch

from conftest import tiny_model
from superposition.settings import rule_settings
from superposition import editing, keys as keys_mod, models
from superposition.facts import Fact
from superposition.matrices import whitened_keys


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
    setup = editing.EditSetup(model, tokenizer, module, K, [1, 2], L, editing.pool_p_matrix(K, L), cfg)
    out = editing.run_sequence(setup, editing.make_method("closed_form", setup), facts[:1], [0], facts[1:])
    assert out.final_success.tolist() == [True], out.steps
    assert out.steps[-1]["consistency_rel_error"] < 1e-10  # algebra of the float64 master copy
    # measured in the model's float32 forward at the retained facts' subject tokens
    assert out.steps[-1]["prediction_rel_error"] < 1e-3, out.steps
    assert out.steps[-1]["measured_interference_mean"] > 0
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


def _constrained_setup(seed=4, d=24, m=10, d_out=7):
    rng = np.random.default_rng(seed)
    C = _random_spd(rng, d)
    L = scipy.linalg.cholesky(C, lower=True)
    keys = rng.standard_normal((m + 1, d))  # row 0 is the edit's key, the rest are protected
    return rng, C, L, keys, rng.standard_normal(d_out)


def test_control_update_leaves_the_constrained_keys_unchanged_and_maps_the_edit_key_to_delta():
    rng, C, L, keys, delta = _constrained_setup()
    k_e, protected = keys[0], keys[1:]
    update, gain = editing.control_update(delta, k_e, whitened_keys(protected, L), L)
    scale = np.linalg.norm(delta)
    assert np.abs(update @ protected.T).max() < 1e-10 * scale  # zero interference at every constrained key
    np.testing.assert_allclose(update @ k_e, delta, rtol=1e-10, atol=0)  # u^T k_e = 1
    assert gain == pytest.approx(1.0, abs=1e-12)
    # the closed form moves the same keys by p * delta, far from zero
    assert np.abs(editing.closed_form_update(delta, k_e, L) @ protected.T).max() > 1e-2 * scale
    # minimum C-norm: adding any direction n that the constraints allow (A^T n = 0) costs C-norm
    u = update[0] / delta[0]
    A = keys.T
    for _ in range(5):
        r = rng.standard_normal(len(k_e))
        n = r - A @ np.linalg.lstsq(A, r, rcond=None)[0]  # the part of r orthogonal to every constrained key
        assert np.abs(A.T @ n).max() < 1e-10 * np.linalg.norm(n)
        assert (u + n) @ C @ (u + n) > u @ C @ u
    # no protected keys: the control is the closed form
    alone, _ = editing.control_update(delta, k_e, np.zeros((len(k_e), 0)), L)
    np.testing.assert_allclose(alone, editing.closed_form_update(delta, k_e, L), rtol=1e-10, atol=1e-14)


def test_control_update_meets_duplicate_keys_and_reports_an_infeasible_edit():
    rng, C, L, keys, delta = _constrained_setup(seed=5)
    k_e, protected = keys[0], keys[1:]
    # two retained facts with the same subject prefix have the same key: consistent constraints, met exactly
    duplicated = np.vstack([protected, protected[2]])
    update, gain = editing.control_update(delta, k_e, whitened_keys(duplicated, L), L)
    assert gain == pytest.approx(1.0, abs=1e-10)
    assert np.abs(update @ duplicated.T).max() < 1e-10 * np.linalg.norm(delta)
    # the edit's own key among the protected ones: no update changes it alone; least squares splits delta
    clash = np.vstack([protected, k_e])
    update, gain = editing.control_update(delta, k_e, whitened_keys(clash, L), L)
    assert gain == pytest.approx(0.5, abs=1e-8)
    np.testing.assert_allclose(update @ k_e, 0.5 * delta, rtol=1e-8)
    assert np.abs(update @ protected.T).max() < 1e-8 * np.linalg.norm(delta)


def test_relative_null_space_threshold_picks_the_dimension_of_a_known_spectrum():
    rng = np.random.default_rng(6)
    spectrum = np.array([10.0, 5.0, 1.0, 3e-2, 5e-3, 1e-4, 1e-6])  # largest 10: 1e-3 x 10 = 1e-2
    basis = np.linalg.qr(rng.standard_normal((7, 7)))[0]
    C = basis @ np.diag(spectrum) @ basis.T
    projector, dim, eigenvalues = editing.null_space_projector(C, 0.02, relative=1e-3)
    assert dim == 3  # 5e-3, 1e-4, 1e-6
    assert editing.null_space_cutoff(eigenvalues, 0.02, 1e-3) == pytest.approx(1e-2)
    np.testing.assert_allclose(projector, basis[:, 4:] @ basis[:, 4:].T, atol=1e-10)
    # scaling C moves the absolute threshold's dimension, not the relative one's
    assert editing.null_space_projector(C, 0.02)[1] == 3
    assert editing.null_space_projector(100 * C, 0.02)[1] == 2
    assert editing.null_space_projector(100 * C, 0.02, relative=1e-3)[1] == 3  # relative: scale-free
    assert editing.null_space_projector(C, 0.02, relative=5e-3)[1] == 4  # below 0.05: 3e-2 .. 1e-6


TINY_FACTS = [Fact(0, "{} is a native speaker of", "Vladimir Mayakovsky", "Russian", target_new="Spanish"),
              Fact(1, "The capital of {} is", "France", "Paris", target_new="Seattle"),
              Fact(2, "{} is located in", "University of Washington", "Seattle"),
              Fact(3, "The mother tongue of {} is", "Lionel Messi", "Spanish"),
              Fact(4, "The native speaker of {} was", "Windows", "Microsoft"),
              Fact(5, "{} was developed by", "Microsoft Windows", "Microsoft")]


def _tiny_llama_with_c(layer=1):
    from conftest import tiny_tokenizer

    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    keys = _capture_keys(model, layer)
    C = keys.T @ keys / len(keys)
    return model, tokenizer, scipy.linalg.cholesky(C, lower=True)


def test_hooked_output_change_of_a_real_forward_equals_sum_p_delta():
    """Edit a tiny Llama's layer (float32 weights, as the model runs) with closed-form updates; the change of the
    layer's output at each fact's subject token, hooked in the model's own forward, is sum_i p(k_ei, k_j) delta_i."""
    model, tokenizer, L = _tiny_llama_with_c()
    layer = 1
    module = models.key_module(model, layer)
    before = editing._evaluate(model, tokenizer, layer, [], TINY_FACTS, batch_size=4)
    K = keys_mod.run_prompts(model, tokenizer, TINY_FACTS, layers=[layer], predictions=False).keys[:, 0]
    K = K.astype(np.float64)
    P = editing.pool_p_matrix(K, L)
    rng = np.random.default_rng(7)
    W0 = editing.weight_matrix(module)
    out_norm = np.linalg.norm(before.outputs, axis=1).mean()
    edit_rows, W, deltas = [0, 1], W0.copy(), []
    for row in edit_rows:
        delta = rng.standard_normal(W0.shape[0])
        delta *= 0.5 * out_norm / np.linalg.norm(delta)
        W = W + editing.closed_form_update(delta, K[row], L)
        deltas.append(delta)
    editing.set_weight_matrix(module, W)
    after = editing._evaluate(model, tokenizer, layer, [], TINY_FACTS, batch_size=4)
    measured = (after.outputs - before.outputs).T  # (d_out, n_facts), from the hooked forward
    predicted = editing.predicted_interference(P[edit_rows], np.array(deltas))
    assert np.linalg.norm(measured[:, 2:], axis=0).min() > 1e-3 * out_norm  # the retained facts really moved
    error = editing.relative_error(predicted, measured)
    assert error < 1e-4, error  # float32 rounding of the weights and the forward
    # and a wrong prediction (the edits' deltas swapped) is far off
    assert editing.relative_error(editing.predicted_interference(P[edit_rows], np.array(deltas[::-1])),
                                  measured) > 0.1
    # the change travels downstream: the last block's output at the prompt's last token moved
    assert np.linalg.norm(after.hidden - before.hidden, axis=1).min() > 0


def test_the_control_edits_leave_the_retained_facts_unchanged_in_the_model():
    """All three methods on a tiny Llama: the steps report the measured (hooked) interference; the control's is at
    float32 rounding where the closed form's is not, and the closed form's measurement agrees with sum p delta."""
    model, tokenizer, L = _tiny_llama_with_c()
    layer = 1
    module = models.key_module(model, layer)
    K = keys_mod.run_prompts(model, tokenizer, TINY_FACTS, layers=[layer], predictions=False).keys[:, 0]
    K = K.astype(np.float64)
    defaults = rule_settings({}, "lifelong_edit")
    cfg = editing.EditConfig.from_config({**defaults["editing"], "batch_size": 4, "n_edits": 2, "eval_every": 1,
                                          "value_steps": 5, "control_protects_edits": True})
    W_before = module.weight.detach().clone()
    P = editing.pool_p_matrix(K, L)
    setup = editing.EditSetup(model, tokenizer, module, K, [2, 3, 4, 5], L, P, cfg, log=lambda s: None)
    runs = {m: editing.run_sequence(setup, editing.make_method(m, setup), TINY_FACTS[:2], [0, 1], TINY_FACTS[2:])
            for m in ("closed_form", "control")}
    assert torch.equal(module.weight, W_before)
    cf, control = runs["closed_form"].steps[-1], runs["control"].steps[-1]
    assert set(cf) == {"n_edits", *editing.step_fields("closed_form")}
    assert set(control) == {"n_edits", *editing.step_fields("control")}
    assert cf["prediction_rel_error"] < 1e-3 and cf["consistency_rel_error"] < 1e-10
    assert cf["measured_interference_mean"] > 0
    assert control["measured_interference_max"] < 1e-3 * cf["measured_interference_mean"]
    assert control["consistency_interference_max"] < 1e-10 * cf["consistency_interference_mean"]
    assert control["key_gain_min"] == pytest.approx(1.0, abs=1e-9)
    # protected earlier edit: the second control edit leaves the first edit's key unchanged (float64 algebra)
    dv = runs["control"].consistency_dv
    np.testing.assert_allclose(dv[:, 0], runs["control"].deltas[0], rtol=1e-8)
    # the unedited evaluation of an earlier method, reused, gives the same run as evaluating it again
    reused = editing.run_sequence(setup, editing.make_method("control", setup), TINY_FACTS[:2], [0, 1],
                                  TINY_FACTS[2:], unedited=runs["closed_form"].unedited)
    assert reused.unedited is runs["closed_form"].unedited and len(reused.eval_seconds) == 2
    for got, want in zip(reused.steps, runs["control"].steps, strict=True):  # the same numbers (NaN at n = 0)
        assert got.keys() == want.keys()
        np.testing.assert_array_equal([got[k] for k in sorted(got)], [want[k] for k in sorted(want)])
    with pytest.raises(editing.EditingError, match="null_space method needs the null-space projector"):
        editing.make_method("null_space", setup)
    with pytest.raises(editing.EditingError, match="memit method needs its layers"):
        editing.make_method("memit", setup)


def test_methods_setting_is_checked():
    defaults = rule_settings({}, "lifelong_edit")
    base = {**defaults["editing"], "batch_size": 4}
    assert editing.EditConfig.from_config(base).methods == ["closed_form", "null_space", "control"]
    for bad in ([], ["closed_form", "closed_form"], ["rome"]):
        with pytest.raises(editing.EditingError, match="editing.methods"):
            editing.EditConfig.from_config({**base, "methods": bad})


# ------------------------------------------------------------------------------------------------ MEMIT


def _memit_objective_lstsq(keys, residuals, C, mom2_weight):
    """MEMIT's layer objective min ||dW K - R||^2 + lambda tr(dW C dW^T), solved directly: with C = L L^T it is
    the least-squares problem dW [K, sqrt(lambda) L] = [R, 0]."""
    L = np.linalg.cholesky(C)
    A = np.hstack([keys, np.sqrt(mom2_weight) * L])  # (d_m, b + d_m)
    B = np.hstack([residuals, np.zeros((residuals.shape[0], L.shape[1]))])
    return np.linalg.lstsq(A.T, B.T, rcond=None)[0].T


def test_memit_update_is_the_least_squares_solution_of_its_objective():
    rng = np.random.default_rng(11)
    d_m, d_out, b = 20, 6, 4
    C = _random_spd(rng, d_m)
    L = scipy.linalg.cholesky(C, lower=True)
    K, R = rng.standard_normal((d_m, b)), rng.standard_normal((d_out, b))
    for lam in (1e-3, 1.0, 1.5e4):
        got = editing.memit_update(R, K, L, lam)
        want = _memit_objective_lstsq(K, R, C, lam)
        np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-12 * np.abs(want).max())
    # small lambda: the batch's keys get their residuals (b < d_m); large lambda: the update shrinks towards 0
    np.testing.assert_allclose(editing.memit_update(R, K, L, 1e-9) @ K, R, rtol=1e-6, atol=1e-8)
    assert np.linalg.norm(editing.memit_update(R, K, L, 1e6)) < 1e-3 * np.linalg.norm(editing.memit_update(R, K, L, 1.0))


def _memit_setup(model, tokenizer, layers, cfg_overrides, facts=TINY_FACTS, n_edit=2, log=lambda s: None):
    """An EditSetup on a tiny model with MEMIT's layers: C of each from real keys of random token sequences."""
    edit_layer = layers[-1]
    defaults = rule_settings({}, "lifelong_edit")
    cfg = editing.EditConfig.from_config({**defaults["editing"], "batch_size": 4, "methods": ["closed_form", "memit"],
                                          "memit_layers": len(layers), **cfg_overrides})
    run = keys_mod.run_prompts(model, tokenizer, facts, layers=layers, predictions=False)
    memit_layers = {}
    for i, layer in enumerate(layers):
        keys = _capture_keys(model, layer)
        C = keys.T @ keys / len(keys)
        memit_layers[layer] = editing.MemitLayer(scipy.linalg.cholesky(C, lower=True),
                                                 run.keys[:, i].astype(np.float64))
    top = memit_layers[edit_layer]
    setup = editing.EditSetup(model, tokenizer, models.key_module(model, edit_layer), top.K_pool,
                              list(range(n_edit, len(facts))), top.cholesky,
                              editing.pool_p_matrix(top.K_pool, top.cholesky), cfg, log=log,
                              memit_layers=memit_layers)
    return setup, cfg


def _states_independently(model, tokenizer, facts, key_layer, h_layer):
    """Keys at key_layer (run_prompts) and the residual stream after block h_layer (output_hidden_states) at each
    fact's subject token: not the code under test."""
    keys = keys_mod.run_prompts(model, tokenizer, facts, layers=[key_layer], predictions=False)
    hs = []
    for fact, index in zip(facts, keys.token_index):
        ids = torch.as_tensor([tokenizer(fact.text)["input_ids"]])
        with torch.no_grad():
            hs.append(model(input_ids=ids, output_hidden_states=True).hidden_states[h_layer + 1][0, index].numpy())
    return keys.keys[:, 0].astype(np.float64), np.asarray(hs, dtype=np.float64)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])  # nn.Linear and Conv1D (weights stored transposed)
def test_memit_batch_on_a_tiny_float64_model_solves_its_per_layer_objective(model_type):
    """One MEMIT batch of two edits over layers 0 and 1 of a float64 tiny model (layer 1 is not the last block, so
    hidden_states[2] is the residual stream, not normed): z = h_1 + delta; at each layer the keys and h_1 are those of
    the model with the lower layers already edited, the residual is (z - h_1) / (remaining layers), and the update
    is the least-squares solution of MEMIT's objective with that layer's C."""
    from conftest import tiny_tokenizer

    model, tokenizer = tiny_model(model_type).double(), tiny_tokenizer()
    layers, lam = [0, 1], 0.5
    setup, cfg = _memit_setup(model, tokenizer, layers, {"memit_batch_size": 2, "eval_every": 2, "n_edits": 2,
                                                           "value_steps": 5, "memit_mom2_weight": lam})
    method = editing.make_method("memit", setup)
    assert method.batch_size == 2 and method.layers == layers
    W0 = {x: editing.weight_matrix(models.key_module(model, x)) for x in layers}
    edits = TINY_FACTS[:2]
    out = editing.MethodRun("memit")
    method.edit(out, edits, [0, 1], 0)
    assert len(out.deltas) == 2 and len(out.edit_seconds) == 2
    for x in layers:  # the master copies are what the model now holds (the checks below reset the weights)
        np.testing.assert_allclose(editing.weight_matrix(models.key_module(model, x)), method.W[x], rtol=0,
                                   atol=1e-12)
    records = {r["layer"]: r for r in method.last_batch}
    # z: the unedited residual stream after block 1 plus each edit's value vector
    _, h_before = _states_independently(_with_weights(model, W0), tokenizer, edits, 0, 1)
    z = h_before + np.asarray(out.deltas)
    np.testing.assert_allclose(records[1]["z"], z, rtol=1e-10, atol=1e-10)
    for i, layer in enumerate(layers):
        # the model as it was before this layer's update: lower layers edited, this and higher ones not
        partial = {x: W0[x] + (records[x]["update"] if x < layer else 0) for x in layers}
        keys, h_now = _states_independently(_with_weights(model, partial), tokenizer, edits, layer, 1)
        # run_prompts returns keys in float32: agreement to float32 rounding
        np.testing.assert_allclose(records[layer]["keys"], keys, rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(records[layer]["residuals"], (z - h_now).T / (len(layers) - i), rtol=1e-9,
                                   atol=1e-10)
        C = _chol_to_c(setup.memit_layers[layer].cholesky)
        # the objective with the keys just checked (in float64) and the independently computed residuals
        want = _memit_objective_lstsq(records[layer]["keys"].T, (z - h_now).T / (len(layers) - i), C, lam)
        np.testing.assert_allclose(records[layer]["update"], want, rtol=1e-7, atol=1e-10 * np.abs(want).max())
    # layer 0's edit really moved layer 1's keys, far beyond that rounding (so the recomputation matters)
    unedited_keys = _states_independently(_with_weights(model, W0), tokenizer, edits, 1, 1)[0]
    assert np.linalg.norm(records[1]["keys"] - unedited_keys) > 1e-3 * np.linalg.norm(unedited_keys)
    method.restore()  # restore() puts the unedited weights back
    for x in layers:
        np.testing.assert_array_equal(editing.weight_matrix(models.key_module(model, x)), W0[x])


def _chol_to_c(L):
    return L @ L.T


def _with_weights(model, weights):
    """The model with the given down projections set (in place: the caller's sequence of checks resets them)."""
    for layer, W in weights.items():
        editing.set_weight_matrix(models.key_module(model, layer), W)
    return model


def test_memit_runs_in_sequence_and_measures_where_the_keys_fixed_prediction_fails():
    """MEMIT over two layers in batches on a tiny Llama: the steps report how far the measured change at the edited
    layer departs from (W_n - W_0) K_0, the prediction with the keys fixed; that departure is the lower layer's
    edit moving the keys (key_change_mean). Over a single layer the keys stay put and the prediction holds to
    float32 rounding."""
    from conftest import tiny_tokenizer

    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    W_before = {x: models.key_module(model, x).weight.detach().clone() for x in (0, 1)}
    common = {"n_edits": 2, "eval_every": 2, "value_steps": 5, "memit_batch_size": 1, "memit_mom2_weight": 1.0}
    results = {}
    for layers in ([0, 1], [1]):
        setup, cfg = _memit_setup(model, tokenizer, layers, common)
        assert setup.eval_layers == [1] + ([0] if layers == [0, 1] else [])
        cf = editing.run_sequence(setup, editing.make_method("closed_form", setup), TINY_FACTS[:2], [0, 1],
                                  TINY_FACTS[2:])
        run = editing.run_sequence(setup, editing.make_method("memit", setup), TINY_FACTS[:2], [0, 1],
                                   TINY_FACTS[2:], unedited=cf.unedited)
        assert [r["n_edits"] for r in run.steps] == [0, 2]
        assert set(run.steps[-1]) == {"n_edits", *editing.step_fields("memit")}
        assert sorted(run.layer_changes) == layers
        results[tuple(layers)] = run.steps[-1]
        for x in (0, 1):
            assert torch.equal(models.key_module(model, x).weight, W_before[x])
    two, one = results[(0, 1)], results[(1,)]
    assert one["key_change_mean"] < 1e-6 and one["prediction_rel_error"] < 1e-3, one
    assert two["key_change_mean"] > 1e-4, two
    assert two["prediction_rel_error"] > 10 * one["prediction_rel_error"], (one, two)
    assert two["measured_interference_mean"] > 0


def test_run_methods_replays_the_blocks_below_the_lowest_evaluated_layer_and_changes_no_number():
    """Closed form and MEMIT over layers 1-2 of a tiny Llama through run_methods (block 0 replayed) give exactly
    the steps, values and weight changes of run_sequence with every block run; a method editing below the
    lowest evaluated layer is refused."""
    from conftest import tiny_tokenizer

    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    common = {"n_edits": 2, "eval_every": 1, "value_steps": 5, "memit_batch_size": 1, "memit_mom2_weight": 1.0}
    logged = []
    setup, cfg = _memit_setup(model, tokenizer, [1, 2], common, log=logged.append)
    assert setup.eval_layers == [2, 1]
    want = {}
    for name in ("closed_form", "memit"):
        want[name] = editing.run_sequence(setup, editing.make_method(name, setup), TINY_FACTS[:2], [0, 1],
                                          TINY_FACTS[2:])
    calls = []
    models.key_module(model, 0).register_forward_hook(lambda *a: calls.append(1))
    got = editing.run_methods(setup, ["closed_form", "memit"], TINY_FACTS[:2], [0, 1], TINY_FACTS[2:])
    for name, run in want.items():
        for a, b in zip(got[name].steps, run.steps, strict=True):
            np.testing.assert_array_equal([a[k] for k in sorted(a)], [b[k] for k in sorted(b)])
        np.testing.assert_array_equal(got[name].deltas, run.deltas)
        for x in run.layer_changes:
            np.testing.assert_array_equal(got[name].layer_changes[x], run.layer_changes[x])
    replayed = re.search(r"blocks below layer 1 ran for (\d+) prompt batches and were replayed for (\d+)", logged[-1])
    assert replayed and int(replayed[2]) > int(replayed[1]) > 0, logged[-1]
    assert len(calls) == int(replayed[1])  # block 0 ran only for the batches it had not seen
    only_closed_form, _ = _memit_setup(model, tokenizer, [1, 2], {**common, "methods": ["closed_form"]})
    with pytest.raises(editing.EditingError, match="memit edits layer 1, below the lowest evaluated layer 2"):
        editing.run_methods(only_closed_form, ["closed_form", "memit"], TINY_FACTS[:2], [0, 1], TINY_FACTS[2:])


def test_memit_refuses_a_model_that_normalises_its_mlp_output():
    from conftest import tiny_tokenizer

    model, tokenizer = tiny_model("gemma3_text"), tiny_tokenizer()
    setup, _ = _memit_setup(model, tokenizer, [0, 1], {"memit_batch_size": 1})
    with pytest.raises(editing.EditingError, match="normalises its MLP output.*drop memit from editing.methods"):
        editing.make_method("memit", setup)


def test_memit_settings_are_checked():
    defaults = rule_settings({}, "lifelong_edit")
    base = {**defaults["editing"], "batch_size": 4, "methods": ["memit"]}
    with pytest.raises(editing.EditingError, match=r"editing.eval_every \(5\) is not a multiple of "
                                                   r"editing.memit_batch_size \(2\)"):
        editing.EditConfig.from_config({**base, "memit_batch_size": 2})
    editing.EditConfig.from_config({**base, "memit_batch_size": 2, "methods": ["closed_form"]})  # ignored then


# ------------------------------------------------------------------------------------------ ROME's KL term


def _kl_after(model, tokenizer, module, fact, delta, prompt=editing.KL_PROMPT):
    """KL(p || p_0) at the subject's last token of "{subject} is a" with delta added to module's output there,
    computed independently of optimise_value."""
    text = prompt.format(fact.subject)
    ids = torch.as_tensor([tokenizer(text)["input_ids"]])
    index = len(tokenizer(prompt[: prompt.index("{}")] + fact.subject)["input_ids"]) - 1

    def add(mod, args, output):
        output = output.clone()
        output[0, index] += torch.as_tensor(delta, dtype=output.dtype)
        return output

    with torch.no_grad():
        p0 = torch.log_softmax(model(input_ids=ids).logits[0, index].double(), -1)
        handle = module.register_forward_hook(add)
        p = torch.log_softmax(model(input_ids=ids).logits[0, index].double(), -1)
        handle.remove()
    return float((p.exp() * (p - p0)).sum())


def test_kl_term_lowers_the_essence_drift_and_off_runs_no_second_forward():
    from conftest import tiny_tokenizer

    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    fact = Fact(0, "{} is a native speaker of", "Vladimir Mayakovsky", "Russian")
    module = models.key_module(model, 1)
    calls = []
    handle = model.register_forward_pre_hook(lambda mod, args, kwargs: calls.append(1), with_kwargs=True)
    common = dict(steps=25, lr=0.5, weight_decay=0.0, clamp_norm_factor=100.0, early_stop_nll=0.0)
    off = editing.optimise_value(model, tokenizer, module, fact, "Spanish", **common)
    n_off = len(calls)
    calls.clear()
    on = editing.optimise_value(model, tokenizer, module, fact, "Spanish", kl_factor=5.0, **common)
    handle.remove()
    assert n_off == off.steps and len(calls) == 2 * on.steps  # off: one forward a step; on: the KL prompt too
    assert np.isnan(off.kl) and np.isfinite(on.kl) and on.kl >= 0
    kl_off = _kl_after(model, tokenizer, module, fact, off.delta)
    kl_on = _kl_after(model, tokenizer, module, fact, on.delta)
    assert kl_off > 1e-3, kl_off  # without the term the vector moves what the model says after the subject
    assert kl_on < 0.5 * kl_off, (kl_on, kl_off)
    # the search still moves towards the target (its nll below the unedited one)
    assert on.nll < editing.optimise_value(model, tokenizer, module, fact, "Spanish", **{**common, "steps": 1}).nll


# ------------------------------------------------------------------------------ replaying the lower blocks


def _batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (2, 7), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return dict(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0), use_cache=False)


def test_replayed_lower_blocks_give_the_full_forward_bit_for_bit_and_run_once_per_batch(family_model):
    model = family_model.eval().requires_grad_(False)
    n_layers = len(models.blocks(model))
    calls = []
    models.key_module(model, 0).register_forward_hook(lambda *a: calls.append(1))
    first, second = _batch(0), _batch(1)
    with torch.no_grad():
        want = [model(**first).logits, model(**second).logits]
        calls.clear()
        with editing.ReplayBelow(model, n_layers - 1) as replay:
            got = [model(**first).logits, model(**first).logits, model(**second).logits, model(**first).logits]
        assert len(calls) == 2  # block 0 ran for the two distinct batches only
        assert (replay.misses, replay.hits) == (2, 2)
        for logits, expected in zip(got, [want[0], want[0], want[1], want[0]]):
            assert torch.equal(logits, expected)
        # left: the blocks run again
        calls.clear()
        assert torch.equal(model(**first).logits, want[0]) and len(calls) == 1
        assert all("forward" not in block.__dict__ for block in models.blocks(model))


def test_replay_follows_weight_changes_above_the_boundary_and_the_gradient_through_them():
    """Lifelong editing's use: the weights of the boundary layer change between forwards and a value vector added
    at its down projection's output is optimised; outputs and gradients equal those of full forwards."""
    model = tiny_model("llama", n_layers=4).eval().requires_grad_(False)
    module = models.key_module(model, 2)
    batch = _batch(2)

    def loss_and_grad():
        delta = torch.zeros(module.weight.shape[0], requires_grad=True)
        handle = module.register_forward_hook(lambda m, a, out: out + delta)
        try:
            loss = model(**batch).logits.square().mean()
            loss.backward()
        finally:
            handle.remove()
        return loss.detach(), delta.grad

    with torch.no_grad():
        module.weight.mul_(1.5)
    want = loss_and_grad()
    with torch.no_grad():
        module.weight.div_(1.5)
    with editing.ReplayBelow(model, 2) as replay:
        loss_and_grad()  # stored with the weights before the change
        with torch.no_grad():
            module.weight.mul_(1.5)
        got = loss_and_grad()
    assert replay.hits == 1
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_replay_refuses_to_give_the_hidden_states_it_skips():
    model = tiny_model("llama").eval()
    with editing.ReplayBelow(model, 2), pytest.raises(ValueError, match="cannot give the hidden states of the "
                                                                      "blocks it replays"):
        model(**_batch(), output_hidden_states=True)
