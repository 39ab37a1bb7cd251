"""Knowledge keys and next-token predictions for facts, from one batched forward pass.

The key of a fact at layer l is the input of that layer's down projection at the *last token of the subject*,
found from the tokenizer's character offsets (no per-model index arithmetic). Prompts are right-padded and get
explicit position ids, so padding never changes a key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .facts import Fact, FactError
from .models import batch_tokens, blocks, key_module, pad_batch
from .provenance import ProvenanceError, check_artifact, get_attrs, open_h5, write_h5


def subject_last_index(offsets: Sequence[tuple[int, int]], span: tuple[int, int], case_id: Any = "?") -> int:
    """Index of the last token that overlaps the character span of the subject."""
    start, end = span
    hits = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    if not hits:
        raise FactError(f"case_id {case_id}: the subject (characters {start}..{end}) tokenises to nothing")
    return hits[-1]


def target_first_token(tokenizer, text: str, target: str, case_id: Any = "?") -> int:
    """Id of the first token of ``" " + target`` when it continues ``text``."""
    enc = tokenizer(text + " " + target, return_offsets_mapping=True, add_special_tokens=True)
    for token_id, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
        if b > len(text) and b > a:
            return int(token_id)
    raise FactError(f"case_id {case_id}: target {target!r} tokenises to nothing after its prompt")


# ROME-style context prefixes as a fixed preset (facts.prompt_mode: context): short, neutral, and none of them
# bare, so that no averaged key sits at the sequence's first position.
CONTEXT_PRESET = ("The following is a fact. {}", "Here is what I know. {}", "In the encyclopedia: {}",
                  "Some background. {}", "As recorded, {}")


@dataclass
class PromptRun:
    keys: np.ndarray | None  # (n_facts, n_layers, d_m) float32, or None
    token_index: list[int]  # subject's last token per fact (first template)
    token_str: list[str]
    first_position: list[bool]  # the subject's last token is the sequence's first (after special tokens)
    predicted: list[int]  # argmax next token after the prompt
    target: list[int]  # first token of target_true
    margin: list[float]  # logit[target] - max other logit
    target_prob: list[float]
    # with module_outputs=True: the down projection's *output* at the same token as the key, (n_facts, n_layers, d_out)
    outputs: np.ndarray | None = None
    # with final_hidden=True: the last block's output (residual stream before the final norm) at the bare prompt's
    # last token, (n_facts, d_model) float32
    final_hidden: np.ndarray | None = None


def _encode(tokenizer, texts: Sequence[str], prepend_bos: bool = False):
    enc = tokenizer(list(texts), return_offsets_mapping=True, add_special_tokens=True)
    if prepend_bos:
        bos = tokenizer.bos_token_id
        if bos is None:
            raise FactError(f"facts.prompt_mode is 'bos' but the tokenizer of this model ({type(tokenizer).__name__}) "
                            f"has no BOS token: use as_is, context or exclude_first")
        for ids, offsets in zip(enc["input_ids"], enc["offset_mapping"]):
            if not ids or ids[0] != bos:  # a tokenizer that adds its BOS already keeps it once
                ids.insert(0, bos)
                offsets.insert(0, (0, 0))
    return enc


def leading_special_tokens(offsets: Sequence[tuple[int, int]]) -> int:
    """How many tokens before the text starts (BOS and other special tokens have empty character offsets)."""
    n = 0
    while n < len(offsets) and offsets[n][1] <= offsets[n][0]:
        n += 1
    return n


@dataclass
class PromptRows:
    """One prompt per (fact, template), fact-major: the texts the model reads and where each subject sits."""

    texts: list[str]
    spans: list[tuple[int, int]]  # the subject's characters in each text
    fact_index: list[int]
    template_index: list[int]
    n_templates: int
    key_templates: list[int]  # the templates whose keys are averaged (not the bare prompt added for predictions)

    @property
    def first_rows(self) -> list[int]:
        """The row of each fact's first template (the bare prompt when predictions are wanted)."""
        return [i for i, t in enumerate(self.template_index) if t == 0]


def prompt_rows(facts: Sequence[Fact], context_templates: Sequence[str] | None, predictions: bool) -> PromptRows:
    """Every fact placed in every template; template 0 is the bare prompt "{}" when predictions are wanted."""
    templates = list(context_templates) if context_templates else ["{}"]
    for template in templates:
        if template.count("{}") != 1:
            raise ValueError(f"context template {template!r} must contain exactly one '{{}}'")
    if predictions and templates[0] != "{}":
        templates = ["{}"] + templates
        key_templates = list(range(1, len(templates)))
    else:
        key_templates = list(range(len(templates)))
    rows = PromptRows([], [], [], [], len(templates), key_templates)
    for f_index, fact in enumerate(facts):
        s, e = fact.subject_span
        for t_index, template in enumerate(templates):
            shift = template.index("{}")
            rows.texts.append(template.replace("{}", fact.text, 1))
            rows.spans.append((s + shift, e + shift))
            rows.fact_index.append(f_index)
            rows.template_index.append(t_index)
    return rows


def locate_subjects(tokenizer, facts: Sequence[Fact], rows: PromptRows, prepend_bos: bool = False):
    """The rows' token ids and offsets (``_encode``) and each row's subject's last token."""
    enc = _encode(tokenizer, rows.texts, prepend_bos)
    subject_index = [subject_last_index(offsets, span, facts[f].case_id)
                     for offsets, span, f in zip(enc["offset_mapping"], rows.spans, rows.fact_index)]
    return enc, subject_index


class Capture:
    """Forward hooks that keep, for every batch, the down projections' inputs (the keys) and optionally their
    outputs at each row's key token, and optionally the last block's output at each row's last token.

    ``at(shape, cols, last)`` names those tokens before each forward; used as a context manager, the hooks are
    removed on leaving it.
    """

    def __init__(self, model, layers: Sequence[int], module_outputs: bool = False, final_hidden: bool = False):
        self.device = next(model.parameters()).device
        self.layers = list(layers)
        self.keys: dict[int, list] = {layer: [] for layer in self.layers}
        self.outputs: dict[int, list] = {layer: [] for layer in self.layers}
        self.final: list = []
        self._current: dict[str, Any] = {}
        self._handles = [key_module(model, layer).register_forward_pre_hook(self._key_hook(layer))
                         for layer in self.layers]
        if module_outputs:
            self._handles += [key_module(model, layer).register_forward_hook(self._output_hook(layer))
                              for layer in self.layers]
        if final_hidden:
            self._handles.append(blocks(model)[-1].register_forward_hook(self._final_hook))

    def at(self, shape, cols: Sequence[int], last: Sequence[int]) -> None:
        import torch

        self._current["shape"] = shape
        self._current["rows"] = torch.arange(shape[0], device=self.device)
        self._current["cols"] = torch.as_tensor(cols, device=self.device)
        self._current["last"] = torch.as_tensor(last, device=self.device)

    def _gather(self, x, where: str):
        return x[self._current["rows"], self._current[where]].float().cpu()

    def _key_hook(self, layer):
        def hook(module, args):
            self.keys[layer].append(self._gather(batch_tokens(args[0], self._current["shape"]), "cols"))
        return hook

    def _output_hook(self, layer):
        def hook(module, args, output):
            self.outputs[layer].append(self._gather(batch_tokens(output, self._current["shape"]), "cols"))
        return hook

    def _final_hook(self, module, args, output):
        self.final.append(self._gather(output[0] if isinstance(output, tuple) else output, "last"))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        return False


def _forward(model, ids, mask, positions, last: Sequence[int], *, predictions: bool, padding_side: str,
             hooked: bool):
    """One batch through the model; the logits at each row's last token when predictions are wanted, else None
    (then only the base model runs, and only if a hook is waiting for it)."""
    import torch

    device = next(model.parameters()).device
    inputs = dict(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                  use_cache=False)
    with torch.inference_mode():
        if predictions and padding_side == "left":
            return model(**inputs, logits_to_keep=1).logits[:, -1].float().cpu()
        if predictions:
            return model(**inputs).logits[torch.arange(len(ids)), torch.as_tensor(last)].float().cpu()
        if hooked:
            model.base_model(**inputs)
    return None


def per_fact(captured_by_layer: Mapping[int, list], layers: Sequence[int], rows: PromptRows) -> np.ndarray:
    """(n_facts, n_layers, width) from the batches captured at every layer: the key templates' mean (float64
    sums, stored float32), or the one key template's rows as they are."""
    import torch

    per_layer = [torch.cat(captured_by_layer[layer]) for layer in layers]  # each (n_rows, width)
    stacked = torch.stack(per_layer, dim=1).numpy()  # (n_rows, n_layers, width)
    stacked = stacked.reshape(-1, rows.n_templates, len(layers), stacked.shape[-1])
    if len(rows.key_templates) > 1:
        return stacked[:, rows.key_templates].mean(axis=1, dtype=np.float64).astype(np.float32)
    return stacked[:, rows.key_templates[0]]


def score_predictions(tokenizer, facts: Sequence[Fact], logits) -> tuple[list[int], list[int], list[float], list[float]]:
    """Argmax, target's first token, margin (logit of the target minus the largest other) and target probability
    from each fact's next-token logits (one row per fact)."""
    import torch

    predicted, target, margin, prob = [], [], [], []
    for row_logits, fact in zip(logits, facts):
        tgt = target_first_token(tokenizer, fact.text, fact.target_true, fact.case_id)
        other = row_logits.clone()
        other[tgt] = -float("inf")
        predicted.append(int(row_logits.argmax()))
        target.append(tgt)
        margin.append(float(row_logits[tgt] - other.max()))
        prob.append(float(torch.softmax(row_logits.double(), dim=0)[tgt]))
    return predicted, target, margin, prob


def run_prompts(
    model,
    tokenizer,
    facts: Sequence[Fact],
    *,
    layers: Sequence[int] | None = None,
    predictions: bool = True,
    context_templates: Sequence[str] | None = None,
    batch_size: int = 64,
    padding_side: str | None = None,
    prepend_bos: bool = False,
    module_outputs: bool = False,
    final_hidden: bool = False,
) -> PromptRun:
    """Keys at ``layers`` (all of them if None; none if an empty list) and next-token predictions for ``facts``.

    ``context_templates`` (ROME-style, e.g. ``["{}", "The following is true. {}"]``) average each key over the
    prompt placed in every template; predictions always use the bare prompt. ``prepend_bos`` starts every
    sequence with the tokenizer's BOS token (an error for a tokenizer without one). ``module_outputs`` also
    captures the down projections' outputs at the keys' tokens and ``final_hidden`` the last block's output at the
    prompt's last token, both from the same forward pass.
    """
    import torch

    # Left padding puts every prompt's last token in the last column, so only that column's logits are computed
    # (logits_to_keep=1): the LM head over a 262k vocabulary at every position would dominate. Explicit position
    # ids keep keys identical to right padding.
    padding_side = padding_side or ("left" if predictions else "right")
    n_layers = len(blocks(model))
    layers = list(range(n_layers)) if layers is None else list(layers)
    rows = prompt_rows(facts, context_templates, predictions)
    enc, subject_index = locate_subjects(tokenizer, facts, rows, prepend_bos)
    first_rows = rows.first_rows
    scored = set(first_rows)
    # scored batch by batch, the bare prompts' rows only: a row of Gemma's logits is 1 MB, all 749 facts' 785 MB
    scores: tuple[list, list, list, list] = ([], [], [], [])
    with Capture(model, layers, module_outputs, final_hidden) as capture:
        for begin in range(0, len(rows.texts), batch_size):
            chunk = range(begin, min(begin + batch_size, len(rows.texts)))
            seqs = [enc["input_ids"][i] for i in chunk]
            ids, mask, positions = pad_batch(seqs, tokenizer.pad_token_id, padding_side)
            starts = [ids.shape[1] - len(seq) if padding_side == "left" else 0 for seq in seqs]
            cols = [start + subject_index[i] for start, i in zip(starts, chunk)]
            last = [start + len(seq) - 1 for start, seq in zip(starts, seqs)]
            capture.at(ids.shape, cols, last)
            logits = _forward(model, ids, mask, positions, last, predictions=predictions,
                              padding_side=padding_side, hooked=bool(layers) or final_hidden)
            if logits is not None:
                kept = [i for i in chunk if i in scored]
                rows_logits = logits if len(kept) == len(chunk) else logits[[i - begin for i in kept]]
                for column, values in zip(scores, score_predictions(
                        tokenizer, [facts[rows.fact_index[i]] for i in kept], rows_logits)):
                    column.extend(values)

    keys = per_fact(capture.keys, layers, rows) if layers else None
    outputs = per_fact(capture.outputs, layers, rows) if layers and module_outputs else None
    final = torch.cat(capture.final).numpy()[first_rows] if final_hidden else None
    token_index = [subject_index[i] for i in first_rows]
    token_str = [tokenizer.convert_ids_to_tokens(enc["input_ids"][i][subject_index[i]]) for i in first_rows]
    first_position = [subject_index[i] == leading_special_tokens(enc["offset_mapping"][i]) for i in first_rows]
    return PromptRun(keys, token_index, token_str, first_position, *scores, outputs, final)


# ------------------------------------------------------------------------------------------ storage


def write_keys(path, keys: np.ndarray, case_ids: Sequence[int], token_index: Sequence[int],
               token_str: Sequence[str], first_position: Sequence[bool], layers: Sequence[int],
               record: dict[str, Any]) -> None:
    write_h5(path, {
        "keys": keys,  # (n_facts, n_layers, d_m) float32, as the model computed them
        "case_ids": np.asarray(case_ids, dtype=np.int64),
        "layers": np.asarray(layers, dtype=np.int64),
        "token_index": np.asarray(token_index, dtype=np.int64),
        "token_str": [str(t) for t in token_str],
        "first_position": np.asarray(first_position, dtype=bool),
    }, {**record, "keys_dtype": str(keys.dtype)})


def read_keys(path, *, model: str | Mapping[str, Any], layer: int, d_m: int
              ) -> tuple[np.ndarray, list[int], dict[str, Any]]:
    """Keys of one layer, float64, with their case_ids; checks model and width."""
    with open_h5(path, "keys", "keys") as f:
        attrs = get_attrs(f)
        check_artifact(attrs, path, "keys file", "keys", model)
        layers = list(f["layers"][()])
        if layer not in layers:
            raise ProvenanceError(f"{path} has no keys for layer {layer}")
        keys = f["keys"][:, layers.index(layer), :].astype(np.float64)
        case_ids = [int(c) for c in f["case_ids"][()]]
    if keys.shape[1] != d_m:
        raise ProvenanceError(f"{path}: keys have width {keys.shape[1]}, but the model has d_m {d_m}; rerun keys")
    return keys, case_ids, attrs


def read_first_positions(path, *, model: str | Mapping[str, Any]) -> dict[int, bool]:
    """case_id -> whether the fact's key is the sequence's first token (after special tokens)."""
    with open_h5(path, "keys", "keys") as f:
        check_artifact(get_attrs(f), path, "keys file", "keys", model)
        return {int(c): bool(flag) for c, flag in zip(f["case_ids"][()], f["first_position"][()])}
