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

Four methods run the same edits (``METHODS``, one ``Method`` class each, its ``edit``/``update`` step separate from
the evaluation loop in ``run_sequence``): the closed form; an AlphaEdit-style update restricted to the approximate
null space of C; an interference-free control, the minimum-C-norm rank-one update that maps k_e to delta_e and leaves
every retained fact's key (optionally also every earlier edit's key) exactly unchanged; and MEMIT, batches spread over
several layers, whose lower-layer edits move the edited layer's keys, so that its measured interference departs
from the keys-fixed prediction (measured and reported). The value search optionally adds ROME's essence-drift KL.

Pure functions over arrays (the updates, the prediction, the projector) are separate from the model loop so tests
check the algebra without a model. Weights are kept as a float64 master copy; the model holds them in its dtype.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import scipy.linalg

from .config import ConfigError, check_memit_batches
from .facts import Fact, FactError
from .keys import run_prompts, subject_last_index, target_first_token
from .matrices import gram_whitened, p_matrix, whitened_keys
from .models import _submodule, batch_tokens, blocks, check_layers, family_of_config, key_module

METHODS = ("closed_form", "null_space", "control", "memit")
# ROME's essence-drift prompt (compute_v's kl_prompts)
KL_PROMPT = "{} is a"

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
    kl: float = math.nan  # the essence-drift KL at the end (NaN when the term is off)


def optimise_value(model, tokenizer, module, fact: Fact, target: str, *, steps: int, lr: float,
                   weight_decay: float, clamp_norm_factor: float, early_stop_nll: float, kl_factor: float = 0.0,
                   kl_prompt: str = KL_PROMPT) -> ValueResult:
    """ROME's value search: the vector added to ``module``'s output at the subject's last token that makes the
    frozen model predict ``target`` after the prompt (Adam on -log p(target tokens) + an L2 penalty relative to the
    current value, norm clamped to ``clamp_norm_factor`` times that value's norm).

    ``kl_factor`` > 0 adds ROME's essence-drift term: ``kl_factor * KL(p || p_0)`` of the next-token distribution
    at the subject's last token of ``kl_prompt`` ("{} is a") with the same vector added there, p_0 the distribution
    before the search (the vector zero), so the edit keeps what the model says about the subject in general.
    0 (the default) leaves the search exactly as without the term (no second forward)."""
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
    # the prompt being run and its subject token: the rewriting prompt, or the KL prompt during the KL forward
    state: dict[str, Any] = {"at": (input_ids.shape, subject_index)}
    if kl_factor:
        if kl_prompt.count("{}") != 1:
            raise EditingError(f"KL prompt {kl_prompt!r} must contain exactly one '{{}}' for the subject")
        kl_text = kl_prompt.format(fact.subject)
        kl_enc = tokenizer(kl_text, return_offsets_mapping=True, add_special_tokens=True)
        kl_start = kl_prompt.index("{}")
        kl_subject = subject_last_index(kl_enc["offset_mapping"], (kl_start, kl_start + len(fact.subject)),
                                        fact.case_id)
        kl_ids = torch.as_tensor([kl_enc["input_ids"]], device=device)
    kl_init, kl_value = None, math.nan

    def pre_hook(mod, args):
        if "key" not in state:
            shape, index = state["at"]
            key = batch_tokens(args[0], shape)[0, index]
            state["key"] = key.detach().double().cpu().numpy()

    def hook(mod, args, output):
        shape, index = state["at"]
        if "value" not in state:
            state["value"] = batch_tokens(output, shape)[0, index].detach().float()
        output = output.clone()
        tokens = batch_tokens(output, shape)  # a view: editing it edits output
        tokens[0, index] = tokens[0, index] + delta.to(output.dtype)
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
            if kl_factor:
                state["at"] = (kl_ids.shape, kl_subject)
                kl_logits = model(input_ids=kl_ids, use_cache=False,
                                  logits_to_keep=kl_ids.shape[1] - kl_subject).logits[0, 0]
                state["at"] = (input_ids.shape, subject_index)
                log_p = torch.log_softmax(kl_logits.float(), -1)
                if kl_init is None:  # the first step runs with the vector zero: the unedited distribution
                    kl_init = log_p.detach()
                # sum p (log p - log p_0): KL(p || p_0), ROME's direction (its kl_div(init, current, log_target))
                kl = torch.nn.functional.kl_div(kl_init, log_p, log_target=True, reduction="sum")
                kl_value = float(kl.detach())
                loss = loss + kl_factor * kl
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
                       time.perf_counter() - start, kl_value)


# -------------------------------------------------------------- replaying the blocks below the edits


def _batch_key(value):
    """A hashable key of a forward argument: a tensor's shape, dtype and bytes; a mapping's (Gemma-3's masks per
    attention type) item by item."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return tuple((key, _batch_key(item)) for key, item in sorted(value.items()))
    return (tuple(value.shape), str(value.dtype), value.detach().cpu().numpy().tobytes())


class ReplayBelow:
    """Run the blocks below ``layer`` once per distinct batch and replay their output after that.

    The residual stream entering block ``layer`` is a function of the batch (token ids, attention mask, positions)
    and of the weights below ``layer`` alone. While those weights stay as they are (lifelong editing changes only
    ``layer`` and above), a batch seen before skips the lower blocks: every one of them returns the stored output of
    block ``layer - 1``, so block ``layer`` gets the very tensor it got the first time and every later output is bit
    for bit what the full forward gives. A context manager; inside it no hook below ``layer`` may be needed (a
    replayed batch runs none) and no weight below ``layer`` may change. ``hits``/``misses`` count the batches.
    """

    def __init__(self, model, layer: int, max_batches: int = 64):
        self.model, self.layer, self.max_batches = model, int(layer), int(max_batches)
        self.blocks = blocks(model)
        check_layers([self.layer], len(self.blocks), model.config.model_type)
        self.stored: "collections.OrderedDict[tuple, Any]" = collections.OrderedDict()
        self.hits = self.misses = 0
        self._batch: tuple | None = None
        self._handles: list = []
        self._own_forward: dict[int, Any] = {}  # a forward set on the block itself before (accelerate's hooks)

    def _identify(self, module, args, kwargs) -> None:
        """The batch about to run: a key of its token ids (or input embeddings), mask and positions, and of the
        autograd mode (so that a tensor stored under inference_mode never enters a graph)."""
        import torch

        if kwargs.get("output_hidden_states"):
            raise ValueError("ReplayBelow cannot give the hidden states of the blocks it replays "
                             "(output_hidden_states=True)")
        first = args[0] if args else None
        parts: list = [torch.is_inference_mode_enabled(), torch.is_grad_enabled()]
        for name in ("input_ids", "inputs_embeds", "attention_mask", "position_ids"):
            parts.append(_batch_key(kwargs.get(name, first if name == "input_ids" else None)))
        self._batch = tuple(parts) if parts[2] is not None or parts[3] is not None else None

    def _replaying(self, index: int, forward):
        last = index == self.layer - 1

        def replay(*args, **kwargs):
            stored = self.stored.get(self._batch) if self._batch is not None else None
            if stored is not None:
                if last:
                    self.hits += 1
                    self.stored.move_to_end(self._batch)
                return stored
            out = forward(*args, **kwargs)
            if last and self._batch is not None:
                self.misses += 1
                self.stored[self._batch] = out
                if len(self.stored) > self.max_batches:
                    self.stored.popitem(last=False)
            return out
        return replay

    def __enter__(self) -> "ReplayBelow":
        if self.layer == 0:
            return self
        # the module that runs the blocks (the base model, OPT's decoder, Gemma-3's language model) sees the batch
        parent, _, _ = family_of_config(self.model.config).layers_attr.rpartition(".")
        runner = _submodule(self.model.base_model, parent) if parent else self.model.base_model
        self._handles.append(runner.register_forward_pre_hook(self._identify, with_kwargs=True))
        for index in range(self.layer):
            block = self.blocks[index]
            if "forward" in block.__dict__:
                self._own_forward[index] = block.__dict__["forward"]
            block.forward = self._replaying(index, block.forward)
        return self

    def __exit__(self, *exc) -> bool:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for index in range(self.layer):
            block = self.blocks[index]
            if index in self._own_forward:
                block.forward = self._own_forward.pop(index)
            else:
                block.__dict__.pop("forward", None)  # the class's forward again
        self.stored.clear()
        return False


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
    kl_factor: float
    null_space_threshold: float
    null_space_relative: float | None
    methods: list[str]
    control_protects_edits: bool
    memit_layers: int
    memit_batch_size: int
    memit_mom2_weight: float
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
        if "memit" in out.methods:
            try:
                check_memit_batches(out.eval_every, out.memit_batch_size)
            except ConfigError as err:
                raise EditingError(str(err)) from None
        return out


# Columns of one evaluation (run_sequence's step rows) per method. Measured from the model's own forward:
# edit_success .. measured_relative_interference_mean; algebra of the float64 master copy: consistency_*.
STEP_FIELDS = ("edit_success", "retention", "target_true_prob", "logp_drop_mean", "last_hidden_change_mean",
               "measured_interference_mean", "measured_interference_max", "measured_relative_interference_mean",
               "consistency_interference_mean", "consistency_interference_max")


@dataclass
class MethodRun:
    method: str
    steps: list[dict[str, float]] = field(default_factory=list)
    deltas: list[np.ndarray] = field(default_factory=list)
    value_steps: list[int] = field(default_factory=list)
    value_nll: list[float] = field(default_factory=list)
    value_kl: list[float] = field(default_factory=list)  # the essence-drift KL per edit (NaN when off)
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
    key_drift: float = 0.0  # memit: the same where earlier batches' edits of lower layers moved the key on purpose
    base_out_norm: np.ndarray | None = None  # ||W_0 k_j|| of every pool key (to scale interference)
    weight_change: np.ndarray | None = None  # W_n - W_0 (d_out, d_m) float64 of the edited layer
    layer_changes: dict[int, np.ndarray] = field(default_factory=dict)  # memit: W_n - W_0 of every layer
    unedited: "Evaluation | None" = None  # the evaluation before any edit (the same for every method)


@dataclass
class Evaluation:
    success: np.ndarray  # (n_edits so far,) target_new is the argmax
    known: np.ndarray  # (n_retained,) target_true is the argmax
    logp: np.ndarray  # (n_retained,) log p(target_true)
    outputs: np.ndarray  # (n_retained, d_out) float64 of the float32 output of the edited layer at the subject token
    hidden: np.ndarray  # (n_retained, d_model) the last block's output at the prompt's last token
    # per hooked layer (the edited layer and any extra one): the down projection's output and its key (its input)
    # at the retained facts' subject tokens, float64 of the float32 forward
    layer_outputs: dict[int, np.ndarray] = field(default_factory=dict)
    layer_keys: dict[int, np.ndarray] = field(default_factory=dict)


def layer_of(model, module) -> int:
    """The layer whose down projection ``module`` is."""
    for layer in range(len(blocks(model))):
        if key_module(model, layer) is module:
            return layer
    raise EditingError(f"{type(module).__name__} is not the down projection of any layer of this model")


def _evaluate(model, tokenizer, layer: int, edited: Sequence[Fact], retained: Sequence[Fact],
              batch_size: int, extra_layers: Sequence[int] = ()) -> Evaluation:
    """Edit success (target_new is the argmax) of every edit so far; retention and log p of the retained facts,
    and, from the same forward pass, the edited layer's (and ``extra_layers``') output and key at their subject
    token and the last block's output at their last token."""
    success = np.zeros(0, dtype=bool)
    if edited:
        run = run_prompts(model, tokenizer, edited, layers=[], predictions=True, batch_size=batch_size)
        success = np.asarray(run.predicted) == np.asarray(run.target)
    layers = [layer] + [x for x in extra_layers if x != layer]
    run = run_prompts(model, tokenizer, retained, layers=layers, predictions=True, batch_size=batch_size,
                      module_outputs=True, final_hidden=True)
    known = np.asarray(run.predicted) == np.asarray(run.target)
    logp = np.log(np.maximum(np.asarray(run.target_prob, dtype=np.float64), 1e-300))
    return Evaluation(success, known, logp, run.outputs[:, 0].astype(np.float64),
                      run.final_hidden.astype(np.float64),
                      {x: run.outputs[:, i].astype(np.float64) for i, x in enumerate(layers)},
                      {x: run.keys[:, i].astype(np.float64) for i, x in enumerate(layers)})


@dataclass
class MemitLayer:
    """One layer MEMIT edits: the pipeline's Cholesky factor of its C and its keys of every pool fact."""

    cholesky: np.ndarray  # (d_m, d_m) lower, C + ridge I = L L^T (the whitening file of that layer)
    K_pool: np.ndarray  # (n_pool, d_m) the keys file's keys at that layer


@dataclass
class EditSetup:
    """What every method's run shares: the model and its edited layer (``module``, the configured editing.layer),
    that layer's pipeline keys of the pool and Cholesky factor of C, P over the pool, the retained facts' pool rows
    and the settings; ``projector`` for null_space, ``memit_layers`` (layer -> MemitLayer, the edited layer last)
    for memit."""

    model: Any
    tokenizer: Any
    module: Any
    K_pool: np.ndarray
    retained_rows: list[int]
    cholesky: np.ndarray
    P_pool: np.ndarray
    cfg: EditConfig
    log: Callable[[str], None] = print
    projector: np.ndarray | None = None
    memit_layers: dict[int, MemitLayer] | None = None
    layer: int = field(init=False)

    def __post_init__(self):
        self.layer = layer_of(self.model, self.module)
        self.retained_rows = list(self.retained_rows)

    @property
    def eval_layers(self) -> list[int]:
        """The layers every evaluation hooks: the edited one, and MEMIT's when it runs (the same list for every
        method, so the unedited evaluation is shared)."""
        extra = sorted(self.memit_layers or {}) if "memit" in self.cfg.methods else []
        return [self.layer] + [x for x in extra if x != self.layer]


class Method:
    """One editing method: ``edit`` applies a batch of edits to the model (value search, update, weights), keeping
    a float64 master copy of every layer it edits; ``extra_fields`` computes its own step columns."""

    name = ""
    fields: tuple[str, ...] = ()
    batch_size = 1

    def __init__(self, setup: EditSetup):
        self.setup = setup
        self.modules = {setup.layer: setup.module}
        self.W0 = {setup.layer: weight_matrix(setup.module)}
        self.W = {setup.layer: self.W0[setup.layer].copy()}

    def _value(self, fact: Fact, module) -> ValueResult:
        cfg = self.setup.cfg
        return optimise_value(self.setup.model, self.setup.tokenizer, module, fact, fact.target_new,
                              steps=cfg.value_steps, lr=cfg.value_lr, weight_decay=cfg.weight_decay,
                              clamp_norm_factor=cfg.clamp_norm_factor, early_stop_nll=cfg.early_stop_nll,
                              kl_factor=cfg.kl_factor)

    def edit(self, out: MethodRun, facts: Sequence[Fact], rows: Sequence[int], n_before: int) -> None:
        """One edit at a time at the edited layer: ROME's value search, then this method's rank-one update."""
        for i, (fact, row) in enumerate(zip(facts, rows)):
            value = self._value(fact, self.setup.module)
            start = time.perf_counter()
            key = self.setup.K_pool[row]
            out.key_mismatch = max(out.key_mismatch, float(np.linalg.norm(value.key - key) / np.linalg.norm(key)))
            update = self.update(out, value.delta, key, fact, n_before + i + 1)
            layer = self.setup.layer
            self.W[layer] += update
            set_weight_matrix(self.modules[layer], self.W[layer])
            _record_value(out, value, value.seconds + time.perf_counter() - start)

    def update(self, out: MethodRun, delta: np.ndarray, key: np.ndarray, fact: Fact, n: int) -> np.ndarray:
        raise NotImplementedError  # each single-layer method defines its update

    def extra_fields(self, out: MethodRun, n: int, edit_rows: Sequence[int], measured: np.ndarray, dv: np.ndarray,
                     ev: Evaluation) -> tuple[dict[str, float], str]:
        """This method's own columns of a step and a note for the log line."""
        return {}, ""

    def restore(self) -> None:
        for layer, module in self.modules.items():
            set_weight_matrix(module, self.W0[layer])


def _record_value(out: MethodRun, value: ValueResult, seconds: float) -> None:
    out.deltas.append(value.delta)
    out.value_steps.append(value.steps)
    out.value_nll.append(value.nll)
    out.value_kl.append(value.kl)
    out.edit_seconds.append(seconds)


class ClosedForm(Method):
    """ROME's closed form with the pipeline's C; its interference is sum_i p delta_i, compared with the model."""

    name = "closed_form"
    fields = ("prediction_rel_error", "consistency_rel_error")

    def update(self, out, delta, key, fact, n):
        return closed_form_update(delta, key, self.setup.cholesky)

    def extra_fields(self, out, n, edit_rows, measured, dv, ev):
        retained_rows = self.setup.retained_rows
        predicted = predicted_interference(self.setup.P_pool[list(edit_rows[:n])],
                                           np.asarray(out.deltas).reshape(n, -1)) if n else np.zeros_like(dv)
        row = {"prediction_rel_error": relative_error(predicted[:, retained_rows], measured),
               "consistency_rel_error": relative_error(predicted, dv)}
        out.final_predicted = predicted
        return row, (f"  |measured-pred|/|measured| {row['prediction_rel_error']:.2e}"
                     f"  (consistency {row['consistency_rel_error']:.1e})")


class NullSpace(Method):
    """AlphaEdit-style: the update projected onto C's null space, keeping the earlier edits' keys (their moment)."""

    name = "null_space"

    def __init__(self, setup):
        if setup.projector is None:
            raise EditingError("the null_space method needs the null-space projector of C")
        super().__init__(setup)
        d_m = setup.K_pool.shape[1]
        self.edited_moment = np.zeros((d_m, d_m))

    def update(self, out, delta, key, fact, n):
        update = null_space_update(delta, key, self.setup.projector, self.edited_moment)
        self.edited_moment += np.outer(key, key)
        return update


class Control(Method):
    """The interference-free control: minimum-C-norm update leaving the retained (and earlier edits') keys alone."""

    name = "control"
    fields = ("key_gain_min",)

    def __init__(self, setup):
        super().__init__(setup)
        # the whitened keys the control leaves unchanged: the retained facts' (+ earlier edits')
        self.protected = [whitened_keys(setup.K_pool[setup.retained_rows], setup.cholesky)]

    def update(self, out, delta, key, fact, n):
        update, gain = control_update(delta, key, np.column_stack(self.protected), self.setup.cholesky)
        out.key_gain.append(gain)
        if abs(gain - 1.0) > CONTROL_GAIN_TOLERANCE:
            self.setup.log(f"control: edit {n} (case_id {fact.case_id}, {fact.subject!r}): its key is a combination "
                           f"of the protected keys, so no update changes it alone; least squares gives "
                           f"u^T k_e = {gain:.4f}, the rest of delta lands on those keys")
        if self.setup.cfg.control_protects_edits:
            self.protected.append(whitened_keys(key, self.setup.cholesky)[:, None])
        return update

    def extra_fields(self, out, n, edit_rows, measured, dv, ev):
        return {"key_gain_min": float(min(out.key_gain)) if n else math.nan}, ""


def memit_update(residuals: np.ndarray, keys: np.ndarray, cholesky: np.ndarray, mom2_weight: float) -> np.ndarray:
    """MEMIT's layer update ``R K^T (lambda C + K K^T)^-1`` (Meng et al. 2023, eq. 14; ``memit_main``'s
    ``resid @ solve(mom2_update_weight * cov + K K^T, K)^T``) for keys ``K`` ``(d_m, b)`` and residuals ``R``
    ``(d_out, b)``, with ``C = L L^T``. It minimises ``||(W + dW) K - (W K + R)||^2 + lambda tr(dW C dW^T)``.
    Computed by the push-through identity ``(lambda C + K K^T)^-1 K = C^-1 K (lambda I + K^T C^-1 K)^-1``: one
    solve with the pipeline's Cholesky factor and a ``(b, b)`` one, float64, instead of a ``(d_m, d_m)`` factorisation
    per batch."""
    K = np.asarray(keys, dtype=np.float64)
    c_inv_k = scipy.linalg.cho_solve((cholesky, True), K)
    small = mom2_weight * np.eye(K.shape[1]) + K.T @ c_inv_k
    return np.asarray(residuals, dtype=np.float64) @ scipy.linalg.solve(small, c_inv_k.T, assume_a="pos")


def _adds_mlp_output_to_residual(model) -> bool:
    """MEMIT splits the residual of the last layer over the lower layers' down projections, which is right only
    where a down projection's output is added to the residual stream as it is (not normalised first, as Gemma's
    post-feedforward norm does)."""
    return not any(hasattr(block, "post_feedforward_layernorm") for block in blocks(model))


class Memit(Method):
    """MEMIT (Meng et al. 2023): sequential batches of ``editing.memit_batch_size`` edits, each spread over
    ``editing.memit_layers`` layers ending at the edited layer L. Per batch: z_i = h_L,i + delta_i, the residual
    stream after block L at each fact's subject token plus ROME's value vector found at L (the same search as the
    other methods; at L the down projection's output is added to that stream as it is); then, layer by layer from the
    lowest, the keys of the batch and h_L are recomputed with the lower layers already edited, the residual
    ``(z - h_L) / (remaining layers)`` is written with ``memit_update`` and that layer's C. ``last_batch`` keeps the
    last batch's per-layer keys, residuals and updates (for checks)."""

    name = "memit"
    # measured vs the keys-fixed prediction (W_n - W_0) K_0, at the edited layer and over all MEMIT layers; the
    # relative change of the retained facts' keys at the edited layer (the reason the two differ)
    fields = ("prediction_rel_error", "prediction_rel_error_layers", "key_change_mean")

    def __init__(self, setup):
        if not setup.memit_layers:
            raise EditingError("the memit method needs its layers' Cholesky factors and keys (EditSetup.memit_layers)")
        layers = sorted(setup.memit_layers)
        if layers[-1] != setup.layer:
            raise EditingError(f"MEMIT's layers {layers} must end at the edited layer {setup.layer}")
        if not _adds_mlp_output_to_residual(setup.model):
            raise EditingError(f"editing.methods lists memit, but {setup.model.config.model_type} normalises its MLP "
                               f"output before adding it to the residual stream (post-feedforward norm), so MEMIT's "
                               f"residual cannot be spread over the down projections: drop memit from "
                               f"editing.methods or exclude this model with editing.models")
        super().__init__(setup)
        self.layers = layers
        self.batch_size = setup.cfg.memit_batch_size
        for layer in layers:
            module = key_module(setup.model, layer)
            self.modules[layer] = module
            self.W0[layer] = weight_matrix(module)
            self.W[layer] = self.W0[layer].copy()
        self.last_batch: list[dict[str, Any]] = []

    def states(self, facts: Sequence[Fact], layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Each fact's key at ``layer`` and the residual stream after block L at its subject's last token, from
        the model as it is now: ``(b, d_m)``, ``(b, d_model)`` float64."""
        import torch

        model, tokenizer = self.setup.model, self.setup.tokenizer
        device = next(model.parameters()).device
        keys, hs = [], []
        for fact in facts:
            enc = tokenizer(fact.text, return_offsets_mapping=True, add_special_tokens=True)
            index = subject_last_index(enc["offset_mapping"], fact.subject_span, fact.case_id)
            ids = torch.as_tensor([enc["input_ids"]], device=device)
            seen = {}

            def pre_hook(mod, args):
                seen["key"] = batch_tokens(args[0], ids.shape)[0, index]

            def hook(mod, args, output):
                seen["h"] = (output[0] if isinstance(output, tuple) else output)[0, index]

            handles = [key_module(model, layer).register_forward_pre_hook(pre_hook),
                       blocks(model)[self.setup.layer].register_forward_hook(hook)]
            try:
                with torch.no_grad():
                    model(input_ids=ids, use_cache=False, logits_to_keep=1)
            finally:
                for handle in handles:
                    handle.remove()
            keys.append(seen["key"].double().cpu().numpy())
            hs.append(seen["h"].double().cpu().numpy())
        return np.asarray(keys), np.asarray(hs)

    def edit(self, out, facts, rows, n_before):
        setup, cfg = self.setup, self.setup.cfg
        values = [self._value(fact, setup.module) for fact in facts]  # at L, the model before this batch
        start = time.perf_counter()
        _, h_before = self.states(facts, setup.layer)
        z = h_before + np.asarray([v.delta for v in values])
        self.last_batch = []
        for i, layer in enumerate(self.layers):
            keys, h_now = self.states(facts, layer)  # after this batch's edits of the lower layers
            residuals = (z - h_now).T / (len(self.layers) - i)  # (d_out, b): MEMIT's distribution over layers
            update = memit_update(residuals, keys.T, setup.memit_layers[layer].cholesky, cfg.memit_mom2_weight)
            self.W[layer] += update
            set_weight_matrix(self.modules[layer], self.W[layer])
            self.last_batch.append({"layer": layer, "keys": keys, "residuals": residuals, "update": update,
                                    "z": z, "h": h_now})
        for value, row in zip(values, rows):
            key = setup.K_pool[row]
            out.key_drift = max(out.key_drift, float(np.linalg.norm(value.key - key) / np.linalg.norm(key)))
        seconds = (time.perf_counter() - start) / len(values)  # the batch's shared update time, per edit
        for value in values:
            _record_value(out, value, value.seconds + seconds)

    def extra_fields(self, out, n, edit_rows, measured, dv, ev):
        setup, retained_rows = self.setup, self.setup.retained_rows
        base = out.unedited
        if not n:
            return {"prediction_rel_error": math.nan, "prediction_rel_error_layers": math.nan,
                    "key_change_mean": 0.0}, ""
        predicted, measured_all = [], []
        for layer in self.layers:  # keys-fixed prediction (W_n - W_0) K_0 vs the hooked change, per layer
            predicted.append((self.W[layer] - self.W0[layer]) @ setup.memit_layers[layer].K_pool[retained_rows].T)
            measured_all.append((ev.layer_outputs[layer] - base.layer_outputs[layer]).T)
        k0, k = base.layer_keys[setup.layer], ev.layer_keys[setup.layer]
        row = {"prediction_rel_error": relative_error(predicted[-1], measured),
               "prediction_rel_error_layers": relative_error(np.vstack(predicted), np.vstack(measured_all)),
               "key_change_mean": float((np.linalg.norm(k - k0, axis=1) / np.linalg.norm(k0, axis=1)).mean())}
        return row, (f"  |measured-pred|/|measured| {row['prediction_rel_error']:.2e} (all layers "
                     f"{row['prediction_rel_error_layers']:.2e}), key change {row['key_change_mean']:.2e}")


METHOD_CLASSES = {cls.name: cls for cls in (ClosedForm, NullSpace, Control, Memit)}
assert tuple(METHOD_CLASSES) == METHODS


def make_method(name: str, setup: EditSetup) -> Method:
    if name not in METHOD_CLASSES:
        raise EditingError(f"unknown editing method {name!r}; use one of {METHODS}")
    return METHOD_CLASSES[name](setup)


def step_fields(method: str) -> tuple[str, ...]:
    return STEP_FIELDS + METHOD_CLASSES[method].fields


def _step_row(out: MethodRun, n: int, ev: Evaluation, measured: np.ndarray, dv: np.ndarray,
              retained_rows: Sequence[int]) -> dict[str, float]:
    """The columns every method shares, from one evaluation: measured in the model's own float32 forward (the
    edited layer's output change at each retained fact's subject token, the last block's relative change at its
    last token) and the float64 algebra of the master copy (consistency_*)."""
    measured_norm = np.linalg.norm(measured, axis=0)
    hidden_change = np.linalg.norm(ev.hidden - out.base_hidden, axis=1) / np.linalg.norm(out.base_hidden, axis=1)
    consistency = np.linalg.norm(dv[:, retained_rows], axis=0)
    out.final_hidden_change = hidden_change
    return {"n_edits": n, "edit_success": float(ev.success.mean()) if n else math.nan,
            "retention": float(ev.known.mean()), "target_true_prob": float(np.exp(ev.logp).mean()),
            "logp_drop_mean": float((out.base_logp - ev.logp).mean()),
            "last_hidden_change_mean": float(hidden_change.mean()),
            "measured_interference_mean": float(measured_norm.mean()),
            "measured_interference_max": float(measured_norm.max()),
            "measured_relative_interference_mean":
                float((measured_norm / np.linalg.norm(out.base_outputs, axis=1)).mean()),
            "consistency_interference_mean": float(consistency.mean()),
            "consistency_interference_max": float(consistency.max())}


def _batches(n_edits: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, stop) of each batch; the last one may be shorter."""
    return [(start, min(start + batch_size, n_edits)) for start in range(0, n_edits, batch_size)]


def run_sequence(setup: EditSetup, method: Method, edit_facts: Sequence[Fact], edit_rows: Sequence[int],
                 retained: Sequence[Fact], unedited: Evaluation | None = None) -> MethodRun:
    """Apply ``edit_facts`` (each with ``target_new`` set) with ``method``, in its batches, and evaluate every
    ``eval_every`` edits and after the last.

    ``unedited``: the evaluation before any edit of an earlier method's run on the same model and facts
    (``MethodRun.unedited``); the weights are the same then, so it is reused instead of computed again.
    """
    cfg, log, layer = setup.cfg, setup.log, setup.layer
    out = MethodRun(method.name)
    out.base_out_norm = np.linalg.norm(method.W0[layer] @ setup.K_pool.T, axis=0)
    targets = [dataclasses.replace(f, target_true=f.target_new) for f in edit_facts]
    n_total = len(edit_facts)

    def evaluate(n: int) -> None:
        start = time.perf_counter()
        reuse = n == 0 and unedited is not None
        ev = unedited if reuse else _evaluate(setup.model, setup.tokenizer, layer, targets[:n], retained,
                                              cfg.batch_size, extra_layers=setup.eval_layers)
        if n == 0:
            out.unedited = ev
            out.base_logp, out.base_outputs, out.base_hidden = ev.logp, ev.outputs, ev.hidden
        measured = (ev.outputs - out.base_outputs).T  # (d_out, n_retained), the hooked change at the subject token
        if not reuse:
            out.eval_seconds.append(time.perf_counter() - start)
        dv = (method.W[layer] - method.W0[layer]) @ setup.K_pool.T  # algebra: the master copy on every key, float64
        row = _step_row(out, n, ev, measured, dv, setup.retained_rows)
        extra, note = method.extra_fields(out, n, edit_rows, measured, dv, ev)
        row.update(extra)
        out.steps.append(row)
        out.consistency_dv, out.final_measured = dv, measured
        out.final_logp, out.final_known, out.final_success = ev.logp, ev.known, ev.success
        log(f"{method.name}: {n:4d} edits  success {row['edit_success']:.3f}  retention {row['retention']:.3f}  "
            f"logp drop {row['logp_drop_mean']:.3g}  measured interference {row['measured_interference_mean']:.4g}"
            f"  last-layer change {row['last_hidden_change_mean']:.3g}{note}"
            + ("  (the unedited evaluation of the first method" if reuse else
               f"  ({out.eval_seconds[-1]:.2f} s/evaluation")
            + (f", {np.mean(out.edit_seconds[-cfg.eval_every:]):.2f} s/edit)" if n else ")"))

    try:
        evaluate(0)
        for start, stop in _batches(n_total, method.batch_size):
            method.edit(out, edit_facts[start:stop], edit_rows[start:stop], start)
            if stop % cfg.eval_every == 0 or stop == n_total:
                evaluate(stop)
        out.weight_change = method.W[layer] - method.W0[layer]
        out.layer_changes = {x: method.W[x] - method.W0[x] for x in method.W}
    finally:
        method.restore()  # the next method starts from the unedited model
    return out


def run_methods(setup: EditSetup, methods: Sequence[str], edit_facts: Sequence[Fact], edit_rows: Sequence[int],
                retained: Sequence[Fact]) -> dict[str, MethodRun]:
    """Every method's run of the same edits, one after the other from the unedited model (its evaluation before any
    edit computed once).

    No method edits or hooks a layer below the lowest of ``setup.eval_layers``, so the blocks below it compute the
    same residual stream for a prompt in every forward of the job: they run once per distinct prompt batch and are
    replayed after that (``ReplayBelow``; the outputs are bit for bit those of full forwards).
    """
    boundary = min(setup.eval_layers)
    made = [make_method(name, setup) for name in methods]
    for method in made:
        if min(method.W) < boundary:
            raise EditingError(f"{method.name} edits layer {min(method.W)}, below the lowest evaluated layer "
                               f"{boundary}: its forward passes cannot replay the blocks below")
    runs: dict[str, MethodRun] = {}
    with ReplayBelow(setup.model, boundary) as replay:
        for method in made:
            earlier = next(iter(runs.values()), None)  # before any edit every method sees the same model
            runs[method.name] = run_sequence(setup, method, edit_facts, edit_rows, retained,
                                             unedited=earlier.unedited if earlier else None)
    setup.log(f"blocks below layer {boundary} ran for {replay.misses} prompt batches and were replayed for "
              f"{replay.hits}")
    return runs


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
