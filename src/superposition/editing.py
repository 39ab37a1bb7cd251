"""Lifelong knowledge editing on one MLP layer: the interference the superposition matrix P predicts, measured.

A closed-form edit (ROME/MEMIT, the paper's eq. 3-5) of fact e at a layer whose down projection is ``W``
(``d_out x d_m``, key ``k`` in, value ``v = W k`` out) is

    W <- W + delta_e (C^-1 k_e)^T / (k_e^T C^-1 k_e),     delta_e = v*_e - W k_e,

so any other key k_j's output moves by ``p(k_e, k_j) * delta_e`` with ``p = G_ej / G_ee`` (``G = K C^-1 K^T``).
After n sequential edits every key has received ``sum_i p(k_{e_i}, k_j) delta_i``. This module applies such a
sequence to a real model, checks that the measured change ``(W_n - W_0) K`` equals that prediction, and runs the
same sequence with an AlphaEdit-style update restricted to the approximate null space of C for comparison.

Pure functions over arrays (the update, the prediction, the projector) are separate from the model loop so tests
check the algebra without a model. Weights are kept as a float64 master copy; the model holds them in its dtype.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import scipy.linalg

from .facts import Fact, FactError
from .keys import run_prompts, subject_last_index, target_first_token
from .matrices import gram_whitened, p_matrix
from .models import batch_tokens

METHODS = ("closed_form", "null_space")


class EditingError(ValueError):
    pass


# ------------------------------------------------------------------------------------------- algebra


def closed_form_update(delta: np.ndarray, key: np.ndarray, cholesky: np.ndarray) -> np.ndarray:
    """ROME's rank-one ``delta (C^-1 k)^T / (k^T C^-1 k)`` with ``C = L L^T`` (solves, no inverse)."""
    key = np.asarray(key, dtype=np.float64)
    c_inv_k = scipy.linalg.cho_solve((cholesky, True), key)
    return np.outer(np.asarray(delta, dtype=np.float64), c_inv_k) / float(key @ c_inv_k)


def null_space_projector(C: np.ndarray, threshold: float) -> tuple[np.ndarray, int, np.ndarray]:
    """AlphaEdit's projector ``U U^T`` onto the eigenvectors of C whose eigenvalue is below ``threshold``."""
    eigenvalues, eigenvectors = scipy.linalg.eigh(np.asarray(C, dtype=np.float64))
    small = eigenvalues < threshold
    U = eigenvectors[:, small]
    return U @ U.T, int(small.sum()), eigenvalues


def null_space_update(delta: np.ndarray, key: np.ndarray, projector: np.ndarray,
                      edited_moment: np.ndarray) -> np.ndarray:
    """AlphaEdit's update for one edit, ``delta k^T P ((K_p K_p^T + k k^T) P + I)^-1`` (their eq. 16).

    ``edited_moment`` is ``K_p K_p^T`` of the earlier edits' keys, which AlphaEdit keeps so that later updates
    preserve earlier ones. Every row of the result lies in the row space of P, so ``update @ k0`` is small for
    any key k0 of the preserved second moment C.
    """
    key = np.asarray(key, dtype=np.float64)
    d = key.shape[0]
    lhs = projector @ (edited_moment + np.outer(key, key)) + np.eye(d)
    x = np.linalg.solve(lhs, projector @ key)
    return np.outer(np.asarray(delta, dtype=np.float64), x)


def predicted_interference(P_rows: np.ndarray, deltas: np.ndarray) -> np.ndarray:
    """``sum_i p(k_{e_i}, k_j) delta_i`` for every key j: ``(d_out, n_keys)`` from P rows ``(n_e, n_keys)``."""
    return np.asarray(deltas, dtype=np.float64).T @ np.asarray(P_rows, dtype=np.float64)


def relative_error(predicted: np.ndarray, measured: np.ndarray) -> float:
    scale = np.linalg.norm(measured)
    return float(np.linalg.norm(predicted - measured) / scale) if scale else float(np.linalg.norm(predicted))


# ------------------------------------------------------------------------------------ counterfactuals


def counterfactual_object(fact: Fact, facts: Sequence[Fact], first_token: Callable[[str], int] | None = None) -> str:
    """The object a fact is rewritten to: its own ``target_new`` (CounterFact) or, deterministically, another
    object of the same relation from the fact set whose first token differs from the true object's."""
    if fact.target_new:
        return fact.target_new
    candidates = sorted({f.target_true for f in facts
                         if f.relation_id == fact.relation_id and f.target_true.lower() != fact.target_true.lower()})
    if first_token is not None and candidates:
        true_token = first_token(fact.target_true)
        candidates = [c for c in candidates if first_token(c) != true_token]
    if not fact.relation_id or not candidates:
        raise EditingError(
            f"case_id {fact.case_id} ({fact.subject!r}, relation {fact.relation_id!r}): no counterfactual object "
            f"available: the fact has no target_new and no other fact of its relation has a different object")
    return candidates[fact.case_id % len(candidates)]


# ---------------------------------------------------------------------------------- model plumbing


def _is_conv1d(module) -> bool:
    # GPT-2's Conv1D stores its weight (in, out) and computes x @ W + b.
    return type(module).__name__ == "Conv1D"


def weight_matrix(module) -> np.ndarray:
    """The down projection as a float64 ``(d_out, d_m)`` matrix."""
    w = module.weight.detach().double().cpu().numpy()
    return w.T.copy() if _is_conv1d(module) else w.copy()


def set_weight_matrix(module, W: np.ndarray) -> None:
    import torch

    value = torch.as_tensor(W.T if _is_conv1d(module) else W)
    with torch.no_grad():
        module.weight.copy_(value.to(dtype=module.weight.dtype, device=module.weight.device))


@dataclass
class ValueResult:
    delta: np.ndarray  # (d_out,) float64: v* - v at the subject's last token
    key: np.ndarray  # (d_m,) the key the model computed for this prompt
    steps: int
    nll: float  # mean -log p(target_new tokens) at the end
    seconds: float


def optimise_value(model, tokenizer, module, fact: Fact, target: str, *, steps: int, lr: float,
                   weight_decay: float, clamp_norm_factor: float, early_stop_nll: float) -> ValueResult:
    """ROME's value search: the vector added to ``module``'s output at the subject's last token that makes the
    frozen model predict ``target`` after the prompt (Adam on -log p(target tokens) + an L2 penalty relative to the
    current value, norm clamped to ``clamp_norm_factor`` times that value's norm)."""
    import torch

    start = time.perf_counter()
    text = fact.text
    enc = tokenizer(text + " " + target, return_offsets_mapping=True, add_special_tokens=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    n_prompt = next((i for i, (a, b) in enumerate(offsets) if b > len(text) and b > a), None)
    if n_prompt is None or n_prompt == 0:
        raise FactError(f"case_id {fact.case_id}: target {target!r} tokenises to nothing after its prompt")
    target_ids = ids[n_prompt:]
    subject_index = subject_last_index(offsets[:n_prompt], fact.subject_span, fact.case_id)
    device = next(model.parameters()).device
    input_ids = torch.as_tensor([ids[:-1]], device=device)
    targets = torch.as_tensor(target_ids, device=device)
    n_target = len(target_ids)

    delta = torch.zeros(module.weight.shape[1] if _is_conv1d(module) else module.weight.shape[0],
                        device=device, dtype=torch.float32, requires_grad=True)
    state: dict[str, Any] = {}

    def pre_hook(mod, args):
        if "key" not in state:
            key = batch_tokens(args[0], input_ids.shape)[0, subject_index]
            state["key"] = key.detach().double().cpu().numpy()

    def hook(mod, args, output):
        if "value" not in state:
            state["value"] = batch_tokens(output, input_ids.shape)[0, subject_index].detach().float()
        output = output.clone()
        tokens = batch_tokens(output, input_ids.shape)  # a view: editing it edits output
        tokens[0, subject_index] = tokens[0, subject_index] + delta.to(output.dtype)
        return output

    handles = [module.register_forward_pre_hook(pre_hook), module.register_forward_hook(hook)]
    optimiser = torch.optim.Adam([delta], lr=lr)
    nll_value, used = float("nan"), 0
    try:
        for used in range(1, steps + 1):
            optimiser.zero_grad()
            logits = model(input_ids=input_ids, use_cache=False, logits_to_keep=n_target).logits[0, -n_target:]
            nll = torch.nn.functional.cross_entropy(logits.float(), targets)
            nll_value = float(nll.detach())
            if nll_value < early_stop_nll:
                break
            norm_v = state["value"].norm()
            loss = nll + weight_decay * delta.norm() ** 2 / norm_v ** 2
            loss.backward()
            optimiser.step()
            with torch.no_grad():
                limit = clamp_norm_factor * norm_v
                if delta.norm() > limit:
                    delta.mul_(limit / delta.norm())
    finally:
        for handle in handles:
            handle.remove()
    return ValueResult(delta.detach().double().cpu().numpy(), state["key"], used, nll_value,
                       time.perf_counter() - start)


# ---------------------------------------------------------------------------------------- the run


@dataclass
class EditConfig:
    """The editing settings: the config's editing section (its defaults are the schema's, filled in by
    superposition.settings) and the prompt batch size facts.batch_size."""

    n_edits: int
    eval_every: int
    value_steps: int
    value_lr: float
    weight_decay: float
    clamp_norm_factor: float
    early_stop_nll: float
    null_space_threshold: float
    retained: str
    save_weights: bool
    batch_size: int

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "EditConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(names - set(cfg))
        if missing:
            raise EditingError(f"editing settings lack {missing}: pass the rule's settings "
                               f"(superposition.settings.rule_settings(config, 'lifelong_edit'))")
        return cls(**{k: cfg[k] for k in names})


@dataclass
class MethodRun:
    method: str
    steps: list[dict[str, float]] = field(default_factory=list)
    deltas: list[np.ndarray] = field(default_factory=list)
    value_steps: list[int] = field(default_factory=list)
    value_nll: list[float] = field(default_factory=list)
    edit_seconds: list[float] = field(default_factory=list)
    eval_seconds: list[float] = field(default_factory=list)
    final_dv: np.ndarray | None = None  # (d_out, n_pool) measured (W_n - W_0) K
    final_predicted: np.ndarray | None = None  # closed form only
    base_logp: np.ndarray | None = None  # log p(target_true) of every retained fact before any edit
    final_logp: np.ndarray | None = None  # log p(target_true) of every retained fact after all edits
    final_known: np.ndarray | None = None
    final_success: np.ndarray | None = None  # target_new is the argmax, per edit, after all edits
    key_mismatch: float = 0.0  # largest relative difference, key at edit time vs the pipeline's key
    base_out_norm: np.ndarray | None = None  # ||W_0 k_j|| of every pool key (to scale interference)
    weight_change: np.ndarray | None = None  # W_n - W_0 (d_out, d_m) float64 after the whole sequence


def _evaluate(model, tokenizer, edited: Sequence[Fact], retained: Sequence[Fact], batch_size: int):
    """Edit success (target_new is the argmax) of every edit so far; retention and log p of the retained facts."""
    success = np.zeros(0, dtype=bool)
    if edited:
        run = run_prompts(model, tokenizer, edited, layers=[], predictions=True, batch_size=batch_size)
        success = np.asarray(run.predicted) == np.asarray(run.target)
    run = run_prompts(model, tokenizer, retained, layers=[], predictions=True, batch_size=batch_size)
    known = np.asarray(run.predicted) == np.asarray(run.target)
    logp = np.log(np.maximum(np.asarray(run.target_prob, dtype=np.float64), 1e-300))
    return success, known, logp


def run_sequence(model, tokenizer, module, method: str, edit_facts: Sequence[Fact], retained: Sequence[Fact],
                 K_pool: np.ndarray, edit_rows: Sequence[int], retained_rows: Sequence[int], cholesky: np.ndarray,
                 P_pool: np.ndarray, projector: np.ndarray | None, cfg: EditConfig,
                 log: Callable[[str], None] = print) -> MethodRun:
    """Apply ``edit_facts`` (each with ``target_new`` set) one after another and measure every ``eval_every``."""
    if method not in METHODS:
        raise EditingError(f"unknown editing method {method!r}; use one of {METHODS}")
    W0 = weight_matrix(module)
    W = W0.copy()
    d_m = K_pool.shape[1]
    edited_moment = np.zeros((d_m, d_m))
    out = MethodRun(method)
    out.base_out_norm = np.linalg.norm(W0 @ K_pool.T, axis=0)
    targets = [dataclasses.replace(f, target_true=f.target_new) for f in edit_facts]
    try:
        for n in range(len(edit_facts) + 1):
            if n > 0:
                fact, row = edit_facts[n - 1], edit_rows[n - 1]
                value = optimise_value(model, tokenizer, module, fact, fact.target_new, steps=cfg.value_steps,
                                       lr=cfg.value_lr, weight_decay=cfg.weight_decay,
                                       clamp_norm_factor=cfg.clamp_norm_factor, early_stop_nll=cfg.early_stop_nll)
                start = time.perf_counter()
                key = K_pool[row]
                out.key_mismatch = max(out.key_mismatch,
                                       float(np.linalg.norm(value.key - key) / np.linalg.norm(key)))
                if method == "closed_form":
                    update = closed_form_update(value.delta, key, cholesky)
                else:
                    update = null_space_update(value.delta, key, projector, edited_moment)
                    edited_moment += np.outer(key, key)
                W += update
                set_weight_matrix(module, W)
                out.deltas.append(value.delta)
                out.value_steps.append(value.steps)
                out.value_nll.append(value.nll)
                out.edit_seconds.append(value.seconds + time.perf_counter() - start)
            if n % cfg.eval_every and n != len(edit_facts):
                continue
            start = time.perf_counter()
            success, known, logp = _evaluate(model, tokenizer, targets[:n], retained, cfg.batch_size)
            out.eval_seconds.append(time.perf_counter() - start)
            if out.base_logp is None:
                out.base_logp = logp
            dv = (W - W0) @ K_pool.T  # measured change of the layer's output on every key, float64
            interference = np.linalg.norm(dv[:, retained_rows], axis=0)
            row = {"n_edits": n, "edit_success": float(success.mean()) if n else math.nan,
                   "retention": float(known.mean()), "target_true_prob": float(np.exp(logp).mean()),
                   "logp_drop_mean": float((out.base_logp - logp).mean()),
                   "interference_mean": float(interference.mean()), "interference_max": float(interference.max())}
            if method == "closed_form":
                predicted = predicted_interference(P_pool[list(edit_rows[:n])], np.asarray(out.deltas).reshape(n, -1)) \
                    if n else np.zeros_like(dv)
                row["prediction_rel_error"] = relative_error(predicted, dv) if n else 0.0
                out.final_predicted = predicted
            out.steps.append(row)
            out.final_dv, out.final_logp, out.final_known, out.final_success = dv, logp, known, success
            log(f"{method}: {n:4d} edits  success {row['edit_success']:.3f}  retention {row['retention']:.3f}  "
                f"mean interference {row['interference_mean']:.4g}"
                + (f"  |pred-meas|/|meas| {row['prediction_rel_error']:.2e}" if method == "closed_form" else ""))
        out.weight_change = W - W0
    finally:
        set_weight_matrix(module, W0)  # the next method starts from the unedited model
    return out


def pool_p_matrix(K_pool: np.ndarray, cholesky: np.ndarray) -> np.ndarray:
    """P over all pool keys, by the same definition as the matrices stage (``G / diag(G)`` row-wise)."""
    return p_matrix(gram_whitened(K_pool, cholesky))


def plan_edits(pool_facts: Sequence[Fact], all_facts: Sequence[Fact], n_edits: int, tokenizer) -> tuple[list[Fact], list[int], list[int]]:
    """The first ``n_edits`` known facts become edits (with their counterfactual object); the rest are retained."""
    if n_edits > len(pool_facts):
        raise EditingError(f"editing.n_edits is {n_edits} but only {len(pool_facts)} known facts are available "
                           f"(facts.m, or facts.pool_size with editing.retained: pool): lower editing.n_edits")
    if n_edits == len(pool_facts):
        raise EditingError(f"editing.n_edits ({n_edits}) uses every known fact, so none is left to measure "
                           f"retention on: lower editing.n_edits")

    def first_token(obj, fact):
        return target_first_token(tokenizer, fact.text, obj, fact.case_id)

    edits = []
    for fact in pool_facts[:n_edits]:
        new = counterfactual_object(fact, all_facts, lambda obj, f=fact: first_token(obj, f))
        edits.append(dataclasses.replace(fact, target_new=new))
    return edits, list(range(n_edits)), list(range(n_edits, len(pool_facts)))
