"""Lifelong knowledge editing on one MLP layer: the interference the superposition matrix P predicts, measured.

A closed-form edit (ROME/MEMIT, the paper's eq. 3-5) of fact e at a layer whose down projection is ``W``
(``d_out x d_m``, key ``k`` in, value ``v = W k`` out) is

    W <- W + delta_e (C^-1 k_e)^T / (k_e^T C^-1 k_e),     delta_e = v*_e - W k_e,

so any other key k_j's output moves by ``p(k_e, k_j) * delta_e`` with ``p = G_ej / G_ee`` (``G = K C^-1 K^T``).
After n sequential edits every key has received ``sum_i p(k_{e_i}, k_j) delta_i``. This module applies such a
sequence to a real model and, at every evaluation, *measures* the change of the layer's output at each retained
fact's subject token in the edited model's own forward pass (hooked, float32 as the model runs, minus the unedited
model's output) against that prediction. The algebraic change ``(W_n - W_0) K`` of the float64 master copy equals
the prediction by construction and is reported as a ``consistency_*`` check only.

Three methods run the same edits (``METHODS``): the closed form; an AlphaEdit-style update restricted to the
approximate null space of C; and an interference-free control, the minimum-C-norm rank-one update that maps k_e to
delta_e and leaves every retained fact's key (optionally also every earlier edit's key) exactly unchanged.

Pure functions over arrays (the updates, the prediction, the projector) are separate from the model loop so tests
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
from .matrices import gram_whitened, p_matrix, whitened_keys
from .models import batch_tokens, blocks, key_module

METHODS = ("closed_form", "null_space", "control")

# The control drops whitened directions whose singular value is below this fraction of the largest: keys are float32
# activations, so two keys that differ only at float32 resolution are one key to the model (see control_update).
CONTROL_RCOND = 1e-6
# |u^T k_e - 1| above this means the edit's key is (numerically) a combination of the protected keys
CONTROL_GAIN_TOLERANCE = 1e-6


class EditingError(ValueError):
    pass


# ------------------------------------------------------------------------------------------- algebra


def closed_form_update(delta: np.ndarray, key: np.ndarray, cholesky: np.ndarray) -> np.ndarray:
    """ROME's rank-one ``delta (C^-1 k)^T / (k^T C^-1 k)`` with ``C = L L^T`` (solves, no inverse)."""
    key = np.asarray(key, dtype=np.float64)
    c_inv_k = scipy.linalg.cho_solve((cholesky, True), key)
    return np.outer(np.asarray(delta, dtype=np.float64), c_inv_k) / float(key @ c_inv_k)


def control_update(delta: np.ndarray, key: np.ndarray, protected_whitened: np.ndarray, cholesky: np.ndarray,
                   rcond: float = CONTROL_RCOND) -> tuple[np.ndarray, float]:
    """The interference-free control: ``delta u^T`` with the minimum-C-norm ``u`` such that ``u^T k_e = 1`` and
    ``u^T k_j = 0`` for every protected key, ``u = C^-1 A (A^T C^-1 A)^-1 e_1`` with ``A = [k_e, k_j...]``.

    In whitened coordinates (``z = L^T u``, ``B = L^-1 A``) this is the minimum-norm solution of ``B^T z = e_1``,
    ``z = B (B^T B)^-1 e_1``, computed from the SVD of B (via its QR) as a pseudo-inverse (lstsq): singular values below
    ``rcond`` times the largest are dropped, so duplicate protected keys (the same subject prefix gives the same key)
    are met exactly, and an edit whose own key is a combination of the protected keys, which no update can change
    alone, gets the least-squares compromise ``u^T k_e < 1``. Returns the update and ``u^T k_e`` (1 when feasible).
    ``protected_whitened`` is ``matrices.whitened_keys(K_protected, L)`` ``(d_m, m)``, m may be 0 (then this is the closed form).
    """
    key = np.asarray(key, dtype=np.float64)
    B = np.column_stack([whitened_keys(key, cholesky), np.asarray(protected_whitened, dtype=np.float64)])
    Q, R = np.linalg.qr(B)  # B = Q R, then the SVD of the small (m, m) R: B = (Q U) S V^T
    U, s, Vt = np.linalg.svd(R)
    keep = s > rcond * s[0]
    z = Q @ (U[:, keep] @ (Vt[keep, 0] / s[keep]))
    u = scipy.linalg.solve_triangular(cholesky, z, lower=True, trans="T")
    return np.outer(np.asarray(delta, dtype=np.float64), u), float(u @ key)


def null_space_cutoff(eigenvalues: np.ndarray, threshold: float, relative: float | None = None) -> float:
    """The eigenvalue below which a direction of C counts as null space: ``relative`` times C's largest
    eigenvalue when given (scale-free, comparable across models), else the absolute ``threshold``."""
    return float(relative * np.max(eigenvalues)) if relative is not None else float(threshold)


def null_space_projector(C: np.ndarray, threshold: float, *,
                         relative: float | None = None) -> tuple[np.ndarray, int, np.ndarray]:
    """AlphaEdit's projector ``U U^T`` onto the eigenvectors of C whose eigenvalue is below ``threshold`` (or below
    ``relative`` times the largest eigenvalue); also returns the null space's dimension and C's eigenvalues."""
    eigenvalues, eigenvectors = scipy.linalg.eigh(np.asarray(C, dtype=np.float64))
    small = eigenvalues < null_space_cutoff(eigenvalues, threshold, relative)
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
    null_space_relative: float | None
    methods: list[str]
    control_protects_edits: bool
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
        out = cls(**{k: cfg[k] for k in names})
        out.methods = list(out.methods)
        unknown = [m for m in out.methods if m not in METHODS]
        if unknown or not out.methods or len(set(out.methods)) != len(out.methods):
            raise EditingError(f"editing.methods is {out.methods}: list one or more of {list(METHODS)}, each once")
        return out


# Columns of one evaluation (run_sequence's step rows) per method. Measured from the model's own forward:
# edit_success .. measured_relative_interference_mean; algebra of the float64 master copy: consistency_*.
STEP_FIELDS = ("edit_success", "retention", "target_true_prob", "logp_drop_mean", "last_hidden_change_mean",
               "measured_interference_mean", "measured_interference_max", "measured_relative_interference_mean",
               "consistency_interference_mean", "consistency_interference_max")
METHOD_STEP_FIELDS = {"closed_form": ("prediction_rel_error", "consistency_rel_error"), "null_space": (),
                      "control": ("key_gain_min",)}


def step_fields(method: str) -> tuple[str, ...]:
    return STEP_FIELDS + METHOD_STEP_FIELDS[method]


@dataclass
class MethodRun:
    method: str
    steps: list[dict[str, float]] = field(default_factory=list)
    deltas: list[np.ndarray] = field(default_factory=list)
    value_steps: list[int] = field(default_factory=list)
    value_nll: list[float] = field(default_factory=list)
    edit_seconds: list[float] = field(default_factory=list)
    eval_seconds: list[float] = field(default_factory=list)
    key_gain: list[float] = field(default_factory=list)  # control: u^T k_e per edit (1 unless infeasible)
    consistency_dv: np.ndarray | None = None  # (d_out, n_pool) algebraic (W_n - W_0) K, float64 master copy
    final_predicted: np.ndarray | None = None  # (d_out, n_pool) sum_i p delta_i, closed form only
    final_measured: np.ndarray | None = None  # (d_out, n_retained) hooked output change at the subject token
    final_hidden_change: np.ndarray | None = None  # (n_retained,) ||h_n - h_0|| / ||h_0||, last block, last token
    base_logp: np.ndarray | None = None  # log p(target_true) of every retained fact before any edit
    base_outputs: np.ndarray | None = None  # (n_retained, d_out) the unedited layer's output at the subject token
    base_hidden: np.ndarray | None = None  # (n_retained, d_model) the unedited last block's output at the last token
    final_logp: np.ndarray | None = None  # log p(target_true) of every retained fact after all edits
    final_known: np.ndarray | None = None
    final_success: np.ndarray | None = None  # target_new is the argmax, per edit, after all edits
    key_mismatch: float = 0.0  # largest relative difference, key at edit time vs the pipeline's key
    base_out_norm: np.ndarray | None = None  # ||W_0 k_j|| of every pool key (to scale interference)
    weight_change: np.ndarray | None = None  # W_n - W_0 (d_out, d_m) float64 after the whole sequence
    unedited: "Evaluation | None" = None  # the evaluation before any edit (the same for every method)


@dataclass
class Evaluation:
    success: np.ndarray  # (n_edits so far,) target_new is the argmax
    known: np.ndarray  # (n_retained,) target_true is the argmax
    logp: np.ndarray  # (n_retained,) log p(target_true)
    outputs: np.ndarray  # (n_retained, d_out) float64 of the float32 output of the edited layer at the subject token
    hidden: np.ndarray  # (n_retained, d_model) the last block's output at the prompt's last token


def layer_of(model, module) -> int:
    """The layer whose down projection ``module`` is."""
    for layer in range(len(blocks(model))):
        if key_module(model, layer) is module:
            return layer
    raise EditingError(f"{type(module).__name__} is not the down projection of any layer of this model")


def _evaluate(model, tokenizer, layer: int, edited: Sequence[Fact], retained: Sequence[Fact],
              batch_size: int) -> Evaluation:
    """Edit success (target_new is the argmax) of every edit so far; retention and log p of the retained facts,
    and, from the same forward pass, the edited layer's output at their subject token and the last block's output
    at their last token."""
    success = np.zeros(0, dtype=bool)
    if edited:
        run = run_prompts(model, tokenizer, edited, layers=[], predictions=True, batch_size=batch_size)
        success = np.asarray(run.predicted) == np.asarray(run.target)
    run = run_prompts(model, tokenizer, retained, layers=[layer], predictions=True, batch_size=batch_size,
                      module_outputs=True, final_hidden=True)
    known = np.asarray(run.predicted) == np.asarray(run.target)
    logp = np.log(np.maximum(np.asarray(run.target_prob, dtype=np.float64), 1e-300))
    return Evaluation(success, known, logp, run.outputs[:, 0].astype(np.float64),
                      run.final_hidden.astype(np.float64))


def run_sequence(model, tokenizer, module, method: str, edit_facts: Sequence[Fact], retained: Sequence[Fact],
                 K_pool: np.ndarray, edit_rows: Sequence[int], retained_rows: Sequence[int], cholesky: np.ndarray,
                 P_pool: np.ndarray, projector: np.ndarray | None, cfg: EditConfig,
                 log: Callable[[str], None] = print, unedited: Evaluation | None = None) -> MethodRun:
    """Apply ``edit_facts`` (each with ``target_new`` set) one after another and measure every ``eval_every``.

    ``unedited``: the evaluation before any edit of an earlier method's run on the same model and facts
    (``MethodRun.unedited``); the weights are the same then, so it is reused instead of computed again.
    """
    if method not in METHODS:
        raise EditingError(f"unknown editing method {method!r}; use one of {METHODS}")
    if method == "null_space" and projector is None:
        raise EditingError("the null_space method needs the null-space projector of C")
    layer = layer_of(model, module)
    retained_rows = list(retained_rows)
    W0 = weight_matrix(module)
    W = W0.copy()
    d_m = K_pool.shape[1]
    edited_moment = np.zeros((d_m, d_m))
    if method == "control":  # the whitened keys the control leaves unchanged: the retained facts' (+ earlier edits')
        protected = [whitened_keys(K_pool[retained_rows], cholesky)]
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
                elif method == "null_space":
                    update = null_space_update(value.delta, key, projector, edited_moment)
                    edited_moment += np.outer(key, key)
                else:
                    update, gain = control_update(value.delta, key, np.column_stack(protected), cholesky)
                    out.key_gain.append(gain)
                    if abs(gain - 1.0) > CONTROL_GAIN_TOLERANCE:
                        log(f"control: edit {n} (case_id {fact.case_id}, {fact.subject!r}): its key is a combination "
                            f"of the protected keys, so no update changes it alone; least squares gives "
                            f"u^T k_e = {gain:.4f}, the rest of delta lands on those keys")
                    if cfg.control_protects_edits:
                        protected.append(whitened_keys(key, cholesky)[:, None])
                W += update
                set_weight_matrix(module, W)
                out.deltas.append(value.delta)
                out.value_steps.append(value.steps)
                out.value_nll.append(value.nll)
                out.edit_seconds.append(value.seconds + time.perf_counter() - start)
            if n % cfg.eval_every and n != len(edit_facts):
                continue
            start = time.perf_counter()
            reuse = n == 0 and unedited is not None
            ev = unedited if reuse else _evaluate(model, tokenizer, layer, targets[:n], retained, cfg.batch_size)
            if n == 0:
                out.unedited = ev
                out.base_logp, out.base_outputs, out.base_hidden = ev.logp, ev.outputs, ev.hidden
            # measured in the model's own float32 forward: the edited layer's output change at each retained fact's
            # subject token, and the last block's relative change at its last token
            measured = (ev.outputs - out.base_outputs).T  # (d_out, n_retained)
            measured_norm = np.linalg.norm(measured, axis=0)
            hidden_change = np.linalg.norm(ev.hidden - out.base_hidden, axis=1) / np.linalg.norm(out.base_hidden,
                                                                                                 axis=1)
            if not reuse:
                out.eval_seconds.append(time.perf_counter() - start)
            dv = (W - W0) @ K_pool.T  # algebra: the master copy's change on every key, float64
            consistency = np.linalg.norm(dv[:, retained_rows], axis=0)
            row = {"n_edits": n, "edit_success": float(ev.success.mean()) if n else math.nan,
                   "retention": float(ev.known.mean()), "target_true_prob": float(np.exp(ev.logp).mean()),
                   "logp_drop_mean": float((out.base_logp - ev.logp).mean()),
                   "last_hidden_change_mean": float(hidden_change.mean()),
                   "measured_interference_mean": float(measured_norm.mean()),
                   "measured_interference_max": float(measured_norm.max()),
                   "measured_relative_interference_mean":
                       float((measured_norm / np.linalg.norm(out.base_outputs, axis=1)).mean()),
                   "consistency_interference_mean": float(consistency.mean()),
                   "consistency_interference_max": float(consistency.max())}
            note = ""
            if method == "closed_form":
                predicted = predicted_interference(P_pool[list(edit_rows[:n])], np.asarray(out.deltas).reshape(n, -1)) \
                    if n else np.zeros_like(dv)
                row["prediction_rel_error"] = relative_error(predicted[:, retained_rows], measured)
                row["consistency_rel_error"] = relative_error(predicted, dv)
                out.final_predicted = predicted
                note = (f"  |measured-pred|/|measured| {row['prediction_rel_error']:.2e}"
                        f"  (consistency {row['consistency_rel_error']:.1e})")
            elif method == "control":
                row["key_gain_min"] = float(min(out.key_gain)) if n else math.nan
            out.steps.append(row)
            out.consistency_dv, out.final_measured, out.final_hidden_change = dv, measured, hidden_change
            out.final_logp, out.final_known, out.final_success = ev.logp, ev.known, ev.success
            log(f"{method}: {n:4d} edits  success {row['edit_success']:.3f}  retention {row['retention']:.3f}  "
                f"logp drop {row['logp_drop_mean']:.3g}  measured interference {row['measured_interference_mean']:.4g}"
                f"  last-layer change {row['last_hidden_change_mean']:.3g}{note}"
                + ("  (the unedited evaluation of the first method" if reuse else
                   f"  ({out.eval_seconds[-1]:.2f} s/evaluation")
                + (f", {np.mean(out.edit_seconds[-cfg.eval_every:]):.2f} s/edit)" if n else ")"))
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
