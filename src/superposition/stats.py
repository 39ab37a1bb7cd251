"""Uncentred second moment of the keys, ``C = (1/N) sum_t k_t k_t^T``, for many layers in one forward pass.

One pass over a shard's tokens hooks the down projection of every requested layer; each hook adds the batch's
Gram ``K^T K`` (real tokens only: pad tokens never count) into a float64 accumulator and drops the activations.
The forward stops right after the last requested layer (no later blocks, final norm or LM head). Sums from
several shards merge exactly; a job checkpoints its sums and resumes after a crash with an identical result.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import h5py
import numpy as np

from .models import batch_tokens, blocks, check_layers, key_module, key_width, pad_batch
from .provenance import CHECKSUM, ProvenanceError, atomic_path, check_artifact, get_attrs, open_h5, set_attrs, write_h5

GRAM_DTYPES = ("float32", "float64")


class NonFiniteActivationError(FloatingPointError):
    pass


# Rows per block row of the batch Gram: (CPU, CUDA). 192-384 measured equally fast on the CPU for d_m = 1536. On an
# H200 (benchmarks/gpu_check.py, 2026-12-04) the whole product in one GEMM instead of 1,024-row panels made the
# statistics pass 1.07x (SmolLM2 shape) and 1.46x (Llama-2-7B shape) slower than the panels' in the same run.
GRAM_PANEL = (256, 1024)

# Tokens of keys a layer collects before its Gram is computed: (CPU, CUDA). On the CPU the forward batches that
# waste the least padding hold a few hundred tokens, and a Gram over 514 tokens cost 25.6 us per token against
# 21.2 at 2,048 (d_m = 1,536, 2 threads: the GEMM runs nearer its peak and the float64 add is paid once per
# 2,048 tokens). The buffer (2,048 x d_m float32 per layer) is smaller than the layer's float64 sum. On a GPU
# batches are large already and memory is scarcer: 0 computes every forward batch's Gram at once.
GRAM_TOKENS = (2048, 0)

# Rows of keys transposed per copy when the pending keys are laid out as keys^T for the Gram: (CPU, CUDA); None
# copies each chunk whole. On the CPU a tile that stays in the cache: benchmarks/gram_transpose.py (2 threads, 2,048
# keys in three chunks) d_m = 2,048 (a power-of-two stride) 2.5 ms against 10.8 ms for whole chunks, d_m = 1,536 2.0
# against 2.1 ms; tiles of 64-256 rows measured alike. On an H200 (benchmarks/gpu_check.py, 2026-12-04, passes in
# one run) the tiles' many small copies made the whole statistics pass of a SmolLM2 shape (float32) 1.34x slower
# than whole chunks, of a Llama-2-7B shape (bf16, d_m = 11,008) 1.01x. Either way the same bytes.
TRANSPOSE_ROWS = (128, None)


class StopForward(Exception):
    """Raised by the last hook: nothing after the last requested layer is computed."""


def token_batches(lengths: Sequence[int], max_tokens: int, max_batch: int,
                  overhead_tokens: int = 64) -> list[list[int]]:
    """Deterministic batches of document indices that waste the least work on padding.

    Documents are sorted longest first and cut into contiguous groups by dynamic programming, minimising
    padded positions + ``overhead_tokens`` per batch (the fixed cost of one forward pass: every layer's kernels,
    hooks and key copies). A batch holds at most ``max_batch`` documents and at most
    ``max_tokens`` padded positions (a single document longer than that gets a batch of its own). Greedy
    filling up to ``max_tokens`` left 42% of the positions as padding on short Wikipedia lead sections.
    """
    order = [i for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)) if lengths[i] > 0]
    n = len(order)
    # cost[j]: least cost of batching the first j documents of `order`; cut[j]: where its last batch starts.
    cost = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for i in range(n):  # a batch starting at document i is as wide as that document (the longest of the batch)
        width = lengths[order[i]]
        for j in range(i + 1, min(n, i + max_batch) + 1):
            if j > i + 1 and width * (j - i) > max_tokens:
                break
            candidate = cost[i] + width * (j - i) + overhead_tokens
            if candidate < cost[j]:
                cost[j], cut[j] = candidate, i
    batches: list[list[int]] = []
    j = n
    while j > 0:
        batches.append(order[cut[j]:j])
        j = cut[j]
    return batches[::-1]


def default_batch_overhead(device_type: str) -> int:
    """Fixed cost of one forward pass in tokens' worth of work, for `token_batches`.

    CPU: measured on SmolLM2-135M, 2 threads, 12,388 tokens of 120 lead sections: throughput was flat (430-450
    tokens/s) for any value from 64 to 512, and 0 (85 batches without padding) took 1.5x as long. CUDA: an estimate
    (kernel launches of every layer against a throughput ~100x the CPU's), not measured.
    """
    return 512 if device_type == "cuda" else 64


class LayerGram:
    """One layer's float64 sum of k k^T and the keys still waiting for their Gram product.

    The batch Gram is computed as block rows of its upper triangle (d_m = 1536 in panels of 256 rows: 0.58 of the
    full product's flops, measured 30% faster on the CPU; the full product would also be symmetric to rounding
    only), in torch's own thread pool: scipy's BLAS syrk needs half the flops, but its threads fight torch's for the
    cores, which measured 20% slower overall. `symmetric` mirrors the upper triangle. On the CPU numpy adds each
    panel into the float64 sum (its mixed float32 -> float64 in-place add measured 10-30% faster than torch's on
    the panels); on a GPU torch does.
    """

    def __init__(self, d_m: int, device, panel_rows: int, transpose_rows: int | None):
        import torch

        self._torch = torch
        self.sum = torch.zeros((d_m, d_m), dtype=torch.float64, device=device)
        self.panel_rows = panel_rows
        self.transpose_rows = transpose_rows
        self.numpy_add = device.type == "cpu"
        self.pending: list = []  # (n, d_m) chunks of keys in the batches' order

    def flush(self):
        """Add the pending keys' Gram into the sum; returns a device flag: is the diagonal (sums of squares: NaN,
        Inf or float32 overflow anywhere reaches it) finite."""
        keys_t = self._transposed(self.pending)  # rows of keys^T contiguous: measured faster GEMMs than views
        self.pending.clear()
        total = self.sum.numpy() if self.numpy_add else self.sum  # .numpy() shares the memory
        diagonals = []
        for start in range(0, keys_t.shape[0], self.panel_rows):
            stop = start + self.panel_rows
            panel = keys_t[start:stop] @ keys_t[start:].T  # rows start:stop, columns start:
            diagonals.append(panel.diagonal())
            block = total[start:stop, start:]
            if self.numpy_add:
                np.add(block, panel.numpy(), out=block)
            else:
                block += panel
        return self._torch.isfinite(self._torch.cat(diagonals)).all()

    def _transposed(self, chunks):
        """The chunks' keys as one contiguous (d_m, n) keys^T, copied tile by tile (TRANSPOSE_ROWS)."""
        first = chunks[0]
        keys_t = self._torch.empty((first.shape[1], sum(len(c) for c in chunks)), dtype=first.dtype,
                                   device=first.device)
        column = 0
        for chunk in chunks:
            step = self.transpose_rows or max(len(chunk), 1)
            for row in range(0, len(chunk), step):
                tile = chunk[row:row + step]
                keys_t[:, column:column + len(tile)] = tile.T
                column += len(tile)
        return keys_t

    def symmetric(self) -> np.ndarray:
        S = self.sum.cpu().numpy()
        return np.triu(S) + np.triu(S, 1).T


class KeyHooks:
    """Forward-pre hooks on the down projections of ``layers``: each hands its layer's keys at the real tokens
    (``mask``, set before each forward) to ``take(layer, keys)``; the last layer's hook stops the forward."""

    def __init__(self, model, layers: Sequence[int], take: Callable[[int, Any], None] | None):
        self.model, self.layers, self.take = model, list(layers), take
        self.mask = None
        self._handles: list = []

    def _hook(self, layer: int) -> Callable:
        last = self.layers[-1]

        def hook(module, args):
            self.take(layer, batch_tokens(args[0], self.mask.shape)[self.mask])
            if layer == last:
                raise StopForward
            return None

        return hook

    def __enter__(self):
        for layer in self.layers:
            self._handles.append(key_module(self.model, layer).register_forward_pre_hook(self._hook(layer)))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        return False

    def forward(self, ids, mask, positions) -> None:
        """One forward of the base model up to the last hooked layer."""
        import torch

        self.mask = mask.bool()
        with torch.inference_mode():
            try:
                self.model.base_model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
            except StopForward:
                pass


class GramAccumulator:
    """Float64 sums of k k^T per layer over forward batches: `KeyHooks` capture the keys, one `LayerGram` per
    layer sums them, a Gram product per ``gram_tokens`` keys (computed inside the forward, while they are hot).

    NaN and Inf are caught per batch: a key's sum names the batch even when its Gram is computed later; the flags
    stay on the device until the batch ends (one synchronisation per batch).
    """

    def __init__(self, model, layers: Sequence[int], gram_dtype: str = "float32", gram_tokens: int | None = None):
        import torch

        if gram_dtype not in GRAM_DTYPES:
            raise ValueError(
                f"stats.gram_dtype {gram_dtype!r} is refused: the batch Gram must be float32 or float64 "
                f"(fp16/bf16 sums lose the small eigenvalues that C^-1 depends on)"
            )
        self._torch = torch
        self.model = model
        self.gram_dtype = gram_dtype
        self._dtype = getattr(torch, gram_dtype)
        self.device = next(model.parameters()).device
        self.layers = sorted(set(layers))
        check_layers(self.layers, len(blocks(model)), model.config.model_type)
        on_gpu = self.device.type == "cuda"
        self.gram_tokens = GRAM_TOKENS[on_gpu] if gram_tokens is None else gram_tokens
        if self.gram_tokens < 0:
            raise ValueError(f"stats.gram_tokens must be >= 0, got {self.gram_tokens}")
        self.grams = {layer: LayerGram(key_width(key_module(model, layer)), self.device, GRAM_PANEL[on_gpu],
                                       TRANSPOSE_ROWS[on_gpu]) for layer in self.layers}
        self.count = 0
        # the hooks reach back to this accumulator only inside its `with` block: a lasting reference cycle would
        # keep the float64 sums (31 GB for Llama-2-7B on a GPU) alive until Python's cycle collector happens to run
        self.hooks = KeyHooks(model, self.layers, take=None)
        # the batches whose keys wait for their Gram, their tokens, and this batch's (layer, what, flag) checks
        self._pending_batches: list[int] = []
        self._pending_tokens = 0
        self._flush_in_forward = False
        self._checks: list = []

    @property
    def sums(self) -> dict[int, Any]:
        """Per layer the float64 sum (its upper triangle: the lower is not kept up to date)."""
        return {layer: gram.sum for layer, gram in self.grams.items()}

    def _take_keys(self, layer: int, keys) -> None:
        keys = keys.to(self._dtype)
        self._checks.append((layer, "keys", self._torch.isfinite(keys.sum())))
        self.grams[layer].pending.append(keys)
        if self._flush_in_forward:
            self._checks.append((layer, "Gram", self.grams[layer].flush()))

    def _raise_if_not_finite(self, checks) -> None:
        """checks: (layer, what, flag) with flags still on the device, read with one synchronisation."""
        if not checks:
            return
        flags = self._torch.stack([flag for _, _, flag in checks]).tolist()
        for (layer, what, _), ok in zip(checks, flags):
            if ok:
                continue
            if what == "keys":
                raise NonFiniteActivationError(
                    f"NaN or Inf in the keys of layer {layer} at batch {self._pending_batches[-1]}")
            first, last = self._pending_batches[0], self._pending_batches[-1]
            where = f"batch {first}" if first == last else f"batches {first}-{last}"
            raise NonFiniteActivationError(
                f"the {self.gram_dtype} Gram of layer {layer} over {where} is not finite although its keys are: "
                f"they are too large for {self.gram_dtype} (try stats.gram_dtype: float64)")

    def flush(self) -> None:
        """Add every layer's pending keys into its float64 sum (before a checkpoint and at the end)."""
        if self._pending_tokens:
            self._raise_if_not_finite([(layer, "Gram", gram.flush()) for layer, gram in self.grams.items()])
        self._pending_batches.clear()
        self._pending_tokens = 0

    def symmetric_sums(self) -> dict[int, np.ndarray]:
        self.flush()
        return {layer: gram.symmetric() for layer, gram in self.grams.items()}

    def __enter__(self):
        self.hooks.take = self._take_keys
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.take = None
        return self.hooks.__exit__(*exc)

    def add_batch(self, ids, mask, positions, batch_index: int) -> int:
        ids, mask, positions = ids.to(self.device), mask.to(self.device), positions.to(self.device)
        n = int(mask.sum().item())
        self._pending_batches.append(batch_index)
        self._pending_tokens += n
        # the hooks compute the Gram of their layer's pending keys once enough tokens wait (while they are hot)
        self._flush_in_forward = self._pending_tokens >= self.gram_tokens
        self._checks = []
        self.hooks.forward(ids, mask, positions)
        hooked = sorted({layer for layer, what, _ in self._checks if what == "keys"})
        if hooked != self.layers:
            raise RuntimeError(f"expected {len(self.layers)} hooked layers to run, {len(hooked)} did")
        self._raise_if_not_finite(self._checks)
        if self._flush_in_forward:
            self._pending_batches.clear()
            self._pending_tokens = 0
        self.count += n
        return n


def _row_starts(d: int) -> list[int]:
    """Where each row's upper part (its diagonal on) begins in the packed layout."""
    return [i * d - i * (i - 1) // 2 for i in range(d + 1)]


def pack_upper(S: np.ndarray) -> np.ndarray:
    """The upper triangle of S, row by row (d (d + 1) / 2 values; numpy.triu_indices' order): a symmetric sum
    stored in half the bytes."""
    d = S.shape[0]
    packed = np.empty(d * (d + 1) // 2, dtype=S.dtype)
    starts = _row_starts(d)
    for i in range(d):  # row slices: copies, several times faster than a fancy-indexed gather
        packed[starts[i]:starts[i + 1]] = S[i, i:]
    return packed


def packed_width(n_values: int) -> int:
    d = int((math.isqrt(8 * n_values + 1) - 1) // 2)
    if d * (d + 1) // 2 != n_values:
        raise ValueError(f"{n_values} values are not the upper triangle of a square matrix")
    return d


# unpacking d_m = 2048: 7.8 ms against 63 ms scattering through triu_indices (benchmarks/packed_sums.py, one thread)
UNPACK_TILE = 256


def unpack_upper(packed: np.ndarray, d: int | None = None) -> np.ndarray:
    """The symmetric matrix whose upper triangle ``pack_upper`` stored."""
    d = packed_width(len(packed)) if d is None else d
    S = np.empty((d, d), dtype=packed.dtype)
    starts = _row_starts(d)
    for i in range(d):
        S[i, i:] = packed[starts[i]:starts[i + 1]]
    # the lower triangle copied from the upper in square tiles (a tile and its transpose stay in cache); pure copies,
    # so S is exactly symmetric
    for r in range(0, d, UNPACK_TILE):
        for c in range(0, r, UNPACK_TILE):
            S[r:r + UNPACK_TILE, c:c + UNPACK_TILE] = S[c:c + UNPACK_TILE, r:r + UNPACK_TILE].T
        tile = S[r:r + UNPACK_TILE, r:r + UNPACK_TILE]
        lower = np.tri(len(tile), k=-1, dtype=bool)
        tile[lower] = tile.T[lower]
    return S


def set_matmul_precision(allow_tf32: bool) -> None:
    import torch

    # "highest" keeps fp32 matmuls in true fp32 (no TF32) on Ampere+ GPUs.
    torch.set_float32_matmul_precision("high" if allow_tf32 else "highest")


def plan_digest(lengths: Sequence[int], batches: Sequence[Sequence[int]], layers: Sequence[int],
                segments: Sequence[int] | None = None) -> str:
    digest = hashlib.sha256()
    digest.update(np.asarray(lengths, dtype=np.int64).tobytes())
    for batch in batches:
        digest.update(np.asarray(batch, dtype=np.int64).tobytes() + b"|")
    digest.update(np.asarray(layers, dtype=np.int64).tobytes())
    if segments is not None:
        digest.update(b"segments" + np.asarray(segments, dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]


def segment_batches(lengths: Sequence[int], segments: Sequence[int], max_tokens: int, max_batch: int,
                    overhead_tokens: int) -> tuple[list[list[int]], list[int]]:
    """`token_batches` within each segment (a batch never mixes two segments, so each segment's sum is its own);
    returns the batches (document indices) and each batch's segment, segments in ascending order."""
    segments = np.asarray(segments, dtype=np.int64)
    if len(segments) != len(lengths):
        raise ValueError(f"{len(segments)} segment ids for {len(lengths)} documents")
    if len(segments) and np.any(np.diff(segments) < 0):
        raise ValueError("segment ids must not decrease along the documents (segments are runs of documents)")
    batches, batch_segment = [], []
    for seg in np.unique(segments):
        members = np.flatnonzero(segments == seg)
        for batch in token_batches([lengths[i] for i in members], max_tokens, max_batch, overhead_tokens):
            batches.append([int(members[i]) for i in batch])
            batch_segment.append(int(seg))
    return batches, batch_segment


@dataclass
class FinishedSegments:
    """Segments whose sums are complete: per segment its id, jackknife block, token count and per layer the packed
    upper triangle of its float64 sum. With ``spill_prefix`` (a job with a checkpoint file) each finished segment
    is written at once to its own file beside the checkpoint, so host memory holds one segment at most and a
    checkpoint never rewrites the finished ones; without, they stay in memory."""

    spill_prefix: str | None = None
    plan: str = ""
    ids: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    sums: dict[int, list[np.ndarray]] = field(default_factory=dict)

    def spill_path(self, segment: int) -> Path:
        return Path(f"{self.spill_prefix}.segment-{segment}.h5")

    def close(self, accumulator: "GramAccumulator", segment: int, block: int, count: int) -> None:
        """Move the accumulator's sums (all of this segment's tokens, flushed) here and zero them."""
        accumulator.flush()
        packed = {}
        for layer in accumulator.layers:
            S = accumulator.sums[layer]
            packed[layer] = pack_upper(S.cpu().numpy())
            S.zero_()
        if self.spill_prefix:
            write_h5(self.spill_path(segment), {f"layer_{layer}": values for layer, values in packed.items()},
                     {"plan": self.plan, "segment": int(segment), "block": int(block), "count": int(count)})
        else:
            for layer, values in packed.items():
                self.sums.setdefault(layer, []).append(values)
        self.ids.append(int(segment))
        self.blocks.append(int(block))
        self.counts.append(int(count))

    def each(self, layers: Sequence[int]):
        """(index, {layer: packed sum}) of every finished segment, reading a spilled one at a time."""
        for i, segment in enumerate(self.ids):
            if not self.spill_prefix:
                yield i, {layer: self.sums[layer][i] for layer in layers}
                continue
            with h5py.File(self.spill_path(segment), "r") as f:
                yield i, {layer: f[f"layer_{layer}"][()] for layer in layers}

    def restore(self, ids: Sequence[int], blocks: Sequence[int], counts: Sequence[int], layers: Sequence[int],
                d_m: dict[int, int]) -> str | None:
        """Take over the finished segments a checkpoint names; their spilled files are read whole and checked
        first. Returns what is wrong (nothing restored) or None."""
        for segment, block, count in zip(ids, blocks, counts):
            path = self.spill_path(segment)
            try:
                with h5py.File(path, "r") as f:
                    attrs = get_attrs(f)
                    if (attrs.get("plan"), attrs.get("segment"), attrs.get("count")) != (self.plan, segment, count):
                        return f"{path} belongs to another plan or segment"
                    for layer in layers:
                        values = f[f"layer_{layer}"][()]  # Fletcher-32 checked
                        width = d_m[layer] * (d_m[layer] + 1) // 2
                        if values.shape != (width,) or not np.isfinite(values).all():
                            return f"{path}: layer {layer}'s sum has shape {values.shape} or non-finite values"
            except (OSError, KeyError, ValueError, TypeError) as err:
                return f"{path} cannot be read ({type(err).__name__}: {err})"
        self.ids, self.blocks, self.counts = [int(v) for v in ids], [int(v) for v in blocks], [int(v) for v in counts]
        return None

    def remove_spilled(self) -> None:
        if self.spill_prefix:
            for segment in self.ids:
                self.spill_path(segment).unlink(missing_ok=True)


def _save_sums(path, accumulator: GramAccumulator, finished: FinishedSegments, record: dict[str, Any],
               final: bool) -> None:
    """Final outputs hold one packed sum per segment and layer, in corpus order; checkpoints the accumulator's sums
    as they are (flushed: the current segment's partial sums; packed, as only the upper triangle is kept up to
    date) and the list of finished segments (their sums are in their own files)."""
    record = {**record, "count": accumulator.count, "layers": accumulator.layers, "segments": finished.ids,
              "segment_blocks": finished.blocks, "segment_tokens": finished.counts}
    if not final:
        write_h5(path, {f"layer_{layer}/partial": pack_upper(accumulator.sums[layer].cpu().numpy())
                        for layer in accumulator.layers}, record)
        return
    # streamed row by row from the finished segments' files (write_h5 takes datasets held in memory)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            set_attrs(f, record)
            datasets = {}
            for layer in accumulator.layers:
                d = accumulator.sums[layer].shape[0]
                width = d * (d + 1) // 2
                datasets[layer] = f.create_dataset(f"layer_{layer}/segment_sums", shape=(len(finished.ids), width),
                                                   dtype=np.float64, chunks=(1, width), **CHECKSUM)
            for i, packed in finished.each(accumulator.layers):
                for layer, values in packed.items():
                    datasets[layer][i] = values


def _load_checkpoint(path, accumulator: GramAccumulator, finished: FinishedSegments, plan: str) -> int:
    """Restore the sums of a checkpoint of the same plan, every layer and segment or none; returns the next batch.

    Everything is read and checked before anything is restored, so a checkpoint damaged in a later layer never
    leaves the earlier layers' sums restored (they would be counted twice when the job starts over).
    """
    import torch

    try:
        with h5py.File(path, "r") as f:
            attrs = get_attrs(f)
            if attrs.get("plan") != plan:
                print(f"{path} is a checkpoint of another plan (batches, layers, segments or grouping): not resumed")
                return 0
            partial = {layer: f[f"layer_{layer}/partial"][()] for layer in accumulator.layers}
            ids, blocks, counts = attrs["segments"], attrs["segment_blocks"], attrs["segment_tokens"]
            count, next_batch = int(attrs["count"]), int(attrs["next_batch"])
    except (OSError, KeyError, ValueError, TypeError) as err:
        print(f"{path} is damaged ({type(err).__name__}: {err}): not resumed, starting from batch 0")
        return 0
    widths = {layer: accumulator.sums[layer].shape[0] for layer in accumulator.layers}
    for layer, values in partial.items():
        if values.shape != (widths[layer] * (widths[layer] + 1) // 2,) or not np.isfinite(values).all():
            print(f"{path}: layer {layer}'s sum has shape {values.shape} or non-finite values: not resumed, "
                  f"starting from batch 0")
            return 0
    problem = finished.restore(ids, blocks, counts, accumulator.layers, widths)
    if problem:
        print(f"{problem}: not resumed, starting from batch 0")
        return 0
    for layer, values in partial.items():
        accumulator.sums[layer].copy_(torch.from_numpy(unpack_upper(values, widths[layer])))
    accumulator.count = count
    return next_batch


class JobStopped(RuntimeError):
    """The job was asked to stop (SIGTERM, SIGUSR1) and did so at a checkpoint: its rerun resumes from there."""


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# SLURM signals every process of an srun job step twice at a time limit: once from the step's slurmstepd and once
# from srun, which gets SIGTERM in the batch step and passes it on to its step, milliseconds apart (10 ms on
# tests/test_slurm.py's local cluster). A signal this soon after the first is that same request, not a second one.
REPEATED_SIGNAL_SECONDS = 2.0


@contextlib.contextmanager
def _stop_requests(enabled: bool):
    """While a checkpoint file is kept, SIGTERM or SIGUSR1 (SLURM sends SIGTERM at a time limit or a preemption,
    KillWait seconds before SIGKILL, and either before it with sbatch --signal) ask the job to stop at its next
    checkpoint instead of dying between two; a second signal, REPEATED_SIGNAL_SECONDS or more after the first,
    ends it at once. Yields the list the signals are recorded in."""
    received: list[str] = []
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield received
        return
    first: list[float] = []

    def request(signum, frame):
        name = signal.Signals(signum).name
        if received:
            after = time.monotonic() - first[0]
            if after < REPEATED_SIGNAL_SECONDS:  # the same request delivered twice (SLURM's srun steps)
                print(f"{name} received again {after:.3f} s later: still stopping at the next checkpoint", flush=True)
                return
            # asked twice: stop now (the last checkpoint on disk stays valid)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        first.append(time.monotonic())
        received.append(name)
        print(f"{name} received: stopping at the next checkpoint", flush=True)

    previous = {sig: signal.signal(sig, request) for sig in STOP_SIGNALS}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@dataclass(frozen=True)
class StatsOptions:
    """How one statistics job batches its documents, multiplies its keys and checkpoints: the stats.* keys."""

    max_tokens: int  # stats.max_tokens_per_batch: padded positions per forward batch
    max_batch: int  # stats.max_batch_size: documents per forward batch
    gram_dtype: str  # stats.gram_dtype: the batch products' dtype (the sums are float64)
    gram_tokens: int | None  # stats.gram_tokens: keys per Gram product (None: GRAM_TOKENS of the device)
    allow_tf32: bool  # stats.allow_tf32
    checkpoint_every: int  # stats.checkpoint_every: batches between flushes (and checkpoints, with a file)
    batch_overhead_tokens: int | None = None  # token_batches' cost of one pass (None: default_batch_overhead)

    CONFIG_KEYS = {"max_tokens": "max_tokens_per_batch", "max_batch": "max_batch_size", "gram_dtype": "gram_dtype",
                   "gram_tokens": "gram_tokens", "allow_tf32": "allow_tf32", "checkpoint_every": "checkpoint_every"}

    @classmethod
    def from_config(cls, stats_cfg: Mapping[str, Any] | None = None, **overrides: Any) -> "StatsOptions":
        """From a stats section (a key it lacks: the schema's default), then ``overrides`` by field name."""
        from . import settings

        stats_cfg = stats_cfg or {}
        values = {field_name: stats_cfg[key] if key in stats_cfg else settings.default(f"stats.{key}")
                  for field_name, key in cls.CONFIG_KEYS.items()}
        return cls(**{**values, **overrides})


@dataclass(frozen=True)
class ShardPlan:
    """A shard's forward batches (document indices), each batch's segment, each segment's jackknife block, and
    the plan's name: the batches, layers, segments, accumulator layout and the grouping of tokens into Gram
    products (which moves the float32 rounding). A checkpoint of another plan is never resumed."""

    batches: list[list[int]]
    batch_segment: list[int]
    block_of_segment: dict[int, int]
    name: str

    @classmethod
    def build(cls, lengths: Sequence[int], segments: np.ndarray, segment_blocks: np.ndarray, layers: Sequence[int],
              gram_tokens: int, options: StatsOptions, device_type: str) -> "ShardPlan":
        overhead = options.batch_overhead_tokens
        if overhead is None:
            overhead = default_batch_overhead(device_type)
        batches, batch_segment = segment_batches(lengths, segments, options.max_tokens, options.max_batch, overhead)
        name = (plan_digest(lengths, batches, layers, [*segments, -1, *segment_blocks])
                + f"-upper-g{gram_tokens}-c{options.checkpoint_every}")
        return cls(batches, batch_segment, {int(s): int(b) for s, b in zip(segments, segment_blocks)}, name)


def _accumulate(accumulator: GramAccumulator, docs: Sequence[np.ndarray], plan: ShardPlan, start: int,
                finished: FinishedSegments, pad_id: int, options: StatsOptions,
                checkpoint_path: str | os.PathLike | None, bar) -> None:
    """Run batches ``start``.. of the plan through the model; each segment's sums move to ``finished`` when its
    last batch is done; checkpoints (with a file) every ``options.checkpoint_every`` batches."""
    batch_segment = plan.batch_segment

    def close_segment(index: int) -> None:
        """The batches of a segment end before ``index``: its sums move to ``finished``."""
        segment = batch_segment[index - 1]
        finished.close(accumulator, segment, plan.block_of_segment[segment],
                       accumulator.count - sum(finished.counts))

    with accumulator, _stop_requests(bool(checkpoint_path)) as stop:
        for index in range(start, len(plan.batches)):
            # a segment is closed when the next one's first batch comes (also right after resuming there: a
            # checkpoint is written before that, with the finished segment still in the accumulator)
            if index > 0 and batch_segment[index] != batch_segment[index - 1]:
                close_segment(index)
            ids, mask, positions = pad_batch([docs[i] for i in plan.batches[index]], pad_id)
            bar.update(accumulator.add_batch(ids, mask, positions, index))
            if (index + 1) % options.checkpoint_every == 0:
                # with or without a checkpoint file, so that the result never depends on whether one was written
                accumulator.flush()
                if checkpoint_path and index + 1 < len(plan.batches):
                    _save_sums(checkpoint_path, accumulator, finished, {"plan": plan.name, "next_batch": index + 1},
                               final=False)
                    if stop:  # at a regular checkpoint, so the resumed result has the same bits
                        raise JobStopped(f"stopped on {stop[0]} at batch {index + 1}/{len(plan.batches)}: "
                                         f"checkpoint {checkpoint_path} saved; the job's rerun resumes from it")
        if plan.batches:
            close_segment(len(plan.batches))  # the last Gram products belong to the timed work


def collect_second_moments(
    model,
    docs: Sequence[np.ndarray],
    layers: Sequence[int],
    out_path: str | os.PathLike,
    record: dict[str, Any],
    *,
    pad_id: int,
    options: StatsOptions | None = None,
    segments: Sequence[int] | None = None,
    segment_blocks: Sequence[int] | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Sum k k^T over all real tokens of ``docs`` for every layer in one forward pass per batch; write ``out_path``.

    ``options``: batching, Gram products and checkpoints (None: the schema's defaults). ``segments`` (per document,
    non-decreasing; None - one segment) keeps the sums of each run of documents apart (corpus.document_segments),
    ``segment_blocks`` names each document's jackknife block (None - its segment). With ``checkpoint_path`` the
    job resumes from a checkpoint of the same plan there and stops at a checkpoint on SIGTERM or SIGUSR1.
    """
    from tqdm import tqdm

    options = options or StatsOptions.from_config()
    set_matmul_precision(options.allow_tf32)
    lengths = [len(d) for d in docs]
    segments = np.zeros(len(docs), np.int64) if segments is None else np.asarray(segments, dtype=np.int64)
    segment_blocks = segments if segment_blocks is None else np.asarray(segment_blocks, dtype=np.int64)
    attention = getattr(model.config, "_attn_implementation", None)
    longest = max(lengths, default=0)
    if longest > options.max_tokens:
        # never cut: one forward pass over the whole document. Its activations grow linearly with its length;
        # eager attention's scores with its square (sdpa's fused kernels do not materialise them)
        print(f"{sum(n > options.max_tokens for n in lengths)} documents are longer than "
              f"stats.max_tokens_per_batch = {options.max_tokens} (the longest {longest} tokens): each is a batch of "
              f"its own, whole ({attention} attention)")
    accumulator = GramAccumulator(model, list(layers), options.gram_dtype, options.gram_tokens)
    plan = ShardPlan.build(lengths, segments, segment_blocks, accumulator.layers, accumulator.gram_tokens, options,
                           accumulator.device.type)
    finished = FinishedSegments(str(checkpoint_path) if checkpoint_path else None, plan.name)
    start = 0
    if checkpoint_path and Path(checkpoint_path).exists():
        start = _load_checkpoint(checkpoint_path, accumulator, finished, plan.name)
        if start:
            print(f"resuming from {checkpoint_path} at batch {start}/{len(plan.batches)} ({accumulator.count} tokens)")
    total = sum(lengths)
    done_before = accumulator.count
    t0 = time.perf_counter()
    bar = tqdm(total=total, initial=done_before, unit="tok", unit_scale=True, disable=not progress,
               desc=f"second moments, {len(accumulator.layers)} layers", mininterval=5)
    _accumulate(accumulator, docs, plan, start, finished, pad_id, options, checkpoint_path, bar)
    bar.close()
    elapsed = time.perf_counter() - t0
    if accumulator.count != total or sum(finished.counts) != total:
        raise RuntimeError(f"counted {accumulator.count} tokens ({sum(finished.counts)} in segments) but the shard "
                           f"has {total}")
    throughput = (total - done_before) / elapsed if elapsed > 0 else float("nan")
    summary = {
        **record,
        "plan": plan.name,
        "n_tokens": total,
        "n_batches": len(plan.batches),
        "longest_batch_positions": max((len(b) * lengths[b[0]] for b in plan.batches), default=0),  # of one pass
        "attention_implementation": attention,
        "gram_dtype": options.gram_dtype,
        "gram_tokens": accumulator.gram_tokens,
        "accumulator_dtype": "float64",
        "stored_as": "per segment, the packed upper triangle (row-major, diagonal included) of the float64 sum",
        "model_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "device": str(accumulator.device),
        "allow_tf32": options.allow_tf32,
        "seconds": elapsed,
        "tokens_per_second": throughput,
    }
    _save_sums(out_path, accumulator, finished, summary, final=True)
    if checkpoint_path and Path(checkpoint_path).exists():
        Path(checkpoint_path).unlink()
    finished.remove_spilled()
    print(f"{total} tokens, {len(accumulator.layers)} layers, {len(finished.ids)} segments, {elapsed:.1f} s, "
          f"{throughput:.0f} tokens/s")
    return summary


# ------------------------------------------------------------------------------------------ merging


@dataclass
class Segment:
    """One segment's sum for one layer: id and jackknife block in the corpus order, token count, packed sum."""

    id: int
    block: int
    count: int
    packed: np.ndarray


def read_segments(paths: Sequence[str | os.PathLike], layer: int, *, model: str | Mapping[str, Any], d_m: int,
                  corpus_fingerprint: str, n_shards: int) -> tuple[list[Segment], list[dict[str, Any]]]:
    """Every segment of one layer over the shard files, in corpus order (a segment cut by a shard boundary comes in
    two parts, summed here in shard order), with each file's provenance checked."""
    parts: dict[int, Segment] = {}
    records = []
    seen_shards = set()
    for path in paths:
        with open_h5(path, "activation statistics", "activation_stats") as f:
            attrs = get_attrs(f)
            check_artifact(attrs, path, "statistics block", "activation_stats", model, d_m=d_m)
            if attrs.get("corpus_fingerprint") != corpus_fingerprint:
                raise ProvenanceError(f"{path} was computed on another corpus (fingerprint "
                                      f"{attrs.get('corpus_fingerprint')!r}, expected {corpus_fingerprint!r})")
            if "segments" not in attrs:
                raise ProvenanceError(f"{path} holds no segment sums (written by an older version); rerun "
                                      f"activation_stats")
            name = f"layer_{layer}/segment_sums"
            if layer not in [int(v) for v in attrs.get("layers", [])] or name not in f:
                raise ProvenanceError(f"{path} has no statistics for layer {layer} (it holds {attrs.get('layers')})")
            sums = f[name][()]  # a damaged dataset: open_h5 names the file
            width = d_m * (d_m + 1) // 2
            if sums.shape != (len(attrs["segments"]), width) or sums.dtype != np.float64:
                raise ProvenanceError(f"{path}: {name} has shape {sums.shape} {sums.dtype}, expected "
                                      f"({len(attrs['segments'])}, {width}) float64 (d_m = {d_m})")
            for seg, block, count, packed in zip(attrs["segments"], attrs["segment_blocks"], attrs["segment_tokens"],
                                                 sums):
                seg, block, count = int(seg), int(block), int(count)
                if seg in parts:
                    if parts[seg].block != block:
                        raise ProvenanceError(f"{path}: segment {seg} is in block {block} here and {parts[seg].block} "
                                              f"in another shard")
                    parts[seg] = Segment(seg, block, parts[seg].count + count, parts[seg].packed + packed)
                else:
                    parts[seg] = Segment(seg, block, count, packed)
            seen_shards.add(attrs.get("shard"))
            records.append({"path": str(path), "shard": attrs.get("shard"), "n_tokens": attrs.get("n_tokens"),
                            "segments": [int(v) for v in attrs["segments"]]})
    if seen_shards != set(range(n_shards)):
        raise ProvenanceError(f"expected shards 0..{n_shards - 1}, got {sorted(seen_shards, key=str)}")
    return [parts[seg] for seg in sorted(parts)], records


def shard_sums(path: str | os.PathLike) -> tuple[dict[int, np.ndarray], int]:
    """Every layer's sum over all segments of one statistics file, and its token count (benchmarks, tests; the
    pipeline reads with read_segments, which checks the provenance)."""
    with open_h5(path, "activation statistics", "activation_stats") as f:
        attrs = get_attrs(f)
        return ({int(layer): unpack_upper(f[f"layer_{layer}/segment_sums"][()].sum(axis=0))
                 for layer in attrs["layers"]}, int(attrs["count"]))


def merge_layer(paths: Sequence[str | os.PathLike], layer: int, *, model: str | Mapping[str, Any], d_m: int,
                corpus_fingerprint: str,
                n_shards: int) -> tuple[np.ndarray, int, list[dict[str, Any]]]:
    """One layer's S (summed over the segments in corpus order) and token count. Exact: float64 throughout."""
    segments, records = read_segments(paths, layer, model=model, d_m=d_m, corpus_fingerprint=corpus_fingerprint,
                                      n_shards=n_shards)
    total = segments[0].packed.copy()
    for segment in segments[1:]:
        total += segment.packed
    return unpack_upper(total, d_m), sum(segment.count for segment in segments), records


def write_covariance(path, second_moment: np.ndarray, count: int, record: dict[str, Any]) -> None:
    write_h5(path, {"C": second_moment}, {**record, "n_tokens": count, "dtype": "float64", "centred": False})


def read_covariance(path, *, model: str | Mapping[str, Any], layer: int, d_m: int) -> tuple[np.ndarray, dict[str, Any]]:
    with open_h5(path, "covariance", "covariance") as f:
        attrs = get_attrs(f)
        check_artifact(attrs, path, "covariance", "covariance", model, layer=layer)
        C = f["C"][()]
    if C.shape != (d_m, d_m):
        raise ProvenanceError(f"{path}: covariance has width {C.shape[0]} but model {model!r} has d_m {d_m}")
    return C, attrs


def export_rome_npz(path, second_moment: np.ndarray, count: int, sample_size: int | None) -> None:
    """A layer's statistics in the npz layout ROME/MEMIT/EasyEdit/AlphaEdit read from their stats cache.

    ``mom2.mom2`` is the *sum* of k k^T (their SecondMoment divides by ``mom2.count`` itself), stored float32 as
    the ``_float32_`` in their file name says; ``sample_size`` is the number of corpus documents, which their cache
    loader compares with its own setting (None, statistics over a whole dataset, stored as their boxed null).
    Plain arrays only: their loader needs no pickle.
    """
    boxed_null = np.array(_ROME_NULL_BITS, dtype=np.uint64).view(np.float64)
    state = {
        "constructor": np.array("util.runningstats.CombinedStat()"),
        "mom2.constructor": np.array("util.runningstats.SecondMoment()"),
        "mom2.count": np.array(count, dtype=np.int64),
        "mom2.mom2": (second_moment * count).astype(np.float32),
        "sample_size": boxed_null if sample_size is None else np.array(sample_size, dtype=np.int64),
    }
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, **state)


# ------------------------------------------------------------------------------------------ importing
#
# Statistics computed elsewhere, in ROME's cache layout (ROME, MEMIT, EasyEdit and AlphaEdit share it) or as bare
# means, replace the corpus and the statistics jobs of a model (models.<name>.statistics). ROME's layer_stats names a
# file f"{layer_name}_{precision}_{'-'.join(sorted(to_collect))}{size_suffix}.npz" with size_suffix "" (the whole
# dataset) or f"_{sample_size}", preceded by the literal "_t{batch_tokens}" (their f-string is missing) when
# batch_tokens is below the context length. The npz is their CombinedStat's state_dict: "mom2.mom2" the float32 or
# float64 *sum* of k k^T over "mom2.count" tokens, "mom2.constructor" a string, "sample_size" the document count
# (None boxed as a NaN with the payload 0xfff8000000000002). Nothing is ever loaded with pickle.

IMPORT_SOURCES = ("rome_npz", "mean_npy")
ROME_PRECISIONS = ("float32", "float64")
ROME_STAT_NAMES = ("mean", "mom2", "norm_mean")  # ROME's STAT_TYPES: the parts of the "-"-joined stats field
# |S - S^T| <= SYMMETRY_TOL * max|S|: sums accumulated in float32 (ROME's default precision) differ from their
# transpose by rounding only, far below this; a matrix that is not a second moment (a cross-covariance, two
# matrices mixed up) is far above it.
SYMMETRY_TOL = 1e-4
# smallest eigenvalue >= -PSD_TOL * largest: rounding the entries of S to float32 moves its eigenvalues by at most
# eps32 * ||S||_F <= 1.2e-7 * sqrt(d_m) * lambda_max (Weyl), below 1e-4 * lambda_max for any d_m up to 690,000;
# a second moment is positive semi-definite, so a more negative eigenvalue means the file holds something else
# (e.g. a centred covariance minus a correction, or damaged numbers).
PSD_TOL = 1e-4
_ROME_NULL_BITS = 0xFFF8000000000002


class ImportedStatisticsError(ProvenanceError):
    """An imported statistics file is missing, ambiguous or does not hold a valid key second moment."""


def rome_file_regex(module_name: str):
    import re

    stat = "|".join(ROME_STAT_NAMES)
    return re.compile(rf"{re.escape(module_name)}_(?P<precision>float16|float32|float64)_"
                      rf"(?P<stats>(?:{stat})(?:-(?:{stat}))*)(?P<batch_tokens>_t(?:\d+|\{{batch_tokens\}}))?"
                      rf"(?:_(?P<sample_size>\d+))?\.npz")


def rome_file_for(folder: str | os.PathLike, module_name: str) -> Path:
    """The one ROME statistics file of a module in ``folder``: float32 or float64, any sample size, holding mom2.

    No file, or more than one, is an error naming what was expected (or both candidates)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImportedStatisticsError(f"{folder} is not a folder (it should hold ROME's statistics files, e.g. "
                                      f"{module_name}_float32_mom2_100000.npz)")
    pattern = rome_file_regex(module_name)
    found, refused = [], []
    for path in sorted(folder.iterdir()):
        hit = pattern.fullmatch(path.name)
        if hit and "mom2" in hit.group("stats").split("-"):
            (found if hit.group("precision") in ROME_PRECISIONS else refused).append(path)
    if refused and not found:
        raise ImportedStatisticsError(
            f"{folder}: {', '.join(p.name for p in refused)} is float16, refused (a float16 sum of k k^T loses the "
            f"small eigenvalues C^-1 depends on); recompute it with precision float32 or float64")
    if not found:
        raise ImportedStatisticsError(f"{folder} has no ROME statistics file for {module_name}: expected "
                                      f"{module_name}_float32_mom2_<sample_size>.npz (or _float64_)")
    if len(found) > 1:
        raise ImportedStatisticsError(f"{folder} has {len(found)} ROME statistics files for {module_name}, expected "
                                      f"exactly one: {', '.join(str(p) for p in found)}; move the others away")
    return found[0]


def mean_file_for(pattern: str, layer: int, module_name: str) -> Path:
    """The bare-mean file of a layer: ``pattern`` with {layer} and {module} filled in."""
    if "{layer}" not in pattern and "{module}" not in pattern:
        raise ImportedStatisticsError(f"the pattern {pattern!r} has neither {{layer}} nor {{module}}: every layer "
                                      f"needs its own file, e.g. stats/layer-{{layer}}.npy")
    path = Path(pattern.replace("{layer}", str(layer)).replace("{module}", module_name)).expanduser()
    if not path.is_file():
        raise ImportedStatisticsError(f"no file {path} for layer {layer} (pattern {pattern!r})")
    return path


def _scalar(value: np.ndarray, what: str, path) -> Any:
    if value.shape != ():
        raise ImportedStatisticsError(f"{path}: {what} has shape {value.shape}, expected a scalar")
    if value.dtype.kind == "f" and np.isnan(value):
        bits = int(np.asarray(value, dtype=np.float64).view(np.uint64))
        if bits == _ROME_NULL_BITS:
            return None  # ROME's boxed None
        raise ImportedStatisticsError(f"{path}: {what} is NaN")
    return value.item()


def read_rome_npz(path: str | os.PathLike) -> dict[str, Any]:
    """The second moment a ROME npz holds, without pickle: ``sum`` (as stored), ``count``, what the file says about
    itself (sample size, constructors) and the precision its name declares."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except ValueError as err:  # object arrays need pickle
        raise ImportedStatisticsError(f"{path} cannot be read without pickle ({err}); refused") from None
    except (OSError, EOFError) as err:
        raise ImportedStatisticsError(f"{path} is not a readable npz file ({err})") from None
    missing = [k for k in ("mom2.mom2", "mom2.count") if k not in arrays]
    if missing:
        raise ImportedStatisticsError(f"{path} lacks {', '.join(missing)} (it holds {', '.join(sorted(arrays))}): "
                                      f"not a ROME statistics file with mom2")
    count = _scalar(arrays["mom2.count"], "mom2.count", path)
    if not isinstance(count, (int, float)) or isinstance(count, bool) or float(count) != int(count) or count <= 0:
        raise ImportedStatisticsError(f"{path}: mom2.count is {count!r}, expected a positive token count")
    total = arrays["mom2.mom2"]
    hit = None
    for precision in ROME_PRECISIONS:
        if f"_{precision}_" in path.name:
            hit = precision
    if hit is not None and total.dtype != np.dtype(hit):
        raise ImportedStatisticsError(f"{path}: its name says {hit} but mom2.mom2 is {total.dtype}")
    strings = {k: str(v.item()) for k, v in arrays.items() if v.dtype.kind == "U" and v.shape == ()}
    return {
        "sum": total,
        "count": int(count),
        "sample_size": _scalar(arrays["sample_size"], "sample_size", path) if "sample_size" in arrays else None,
        "stored_dtype": str(total.dtype),
        "constructors": {k: v for k, v in strings.items() if k.endswith("constructor")},
        "entries": sorted(arrays),
    }


def check_second_moment(C: np.ndarray, *, d_m: int, path) -> dict[str, float]:
    """A key second moment: square, d_m wide, finite, symmetric and positive semi-definite to tolerance.
    Returns the checked figures (for the provenance)."""
    import scipy.linalg

    if C.ndim != 2 or C.shape[0] != C.shape[1]:
        raise ImportedStatisticsError(f"{path}: the second moment has shape {C.shape}, expected a square matrix")
    if C.shape[0] != d_m:
        raise ImportedStatisticsError(f"{path}: the second moment is {C.shape[0]} wide but the model's keys are "
                                      f"d_m = {d_m} wide (another model or layer?)")
    if not np.isfinite(C).all():
        raise ImportedStatisticsError(f"{path}: the second moment holds {int((~np.isfinite(C)).sum())} NaN or Inf "
                                      f"entries")
    scale = float(np.abs(C).max())
    asymmetry = float(np.abs(C - C.T).max())
    if asymmetry > SYMMETRY_TOL * scale:
        raise ImportedStatisticsError(f"{path}: the second moment is not symmetric: max |C - C^T| = {asymmetry:.3e} "
                                      f"against max |C| = {scale:.3e} (tolerance {SYMMETRY_TOL:g} relative)")
    eigenvalues = scipy.linalg.eigvalsh((C + C.T) / 2)
    smallest, largest = float(eigenvalues[0]), float(eigenvalues[-1])
    if largest <= 0 or smallest < -PSD_TOL * largest:
        raise ImportedStatisticsError(
            f"{path}: the second moment is not positive semi-definite: smallest eigenvalue {smallest:.3e}, largest "
            f"{largest:.3e} (an uncentred second moment has none below -{PSD_TOL:g} x the largest)")
    return {"max_asymmetry": asymmetry, "min_eigenvalue": smallest, "max_eigenvalue": largest}


def check_sum_or_mean(C: np.ndarray, n_tokens: int, key_scale: dict[str, float], *, claimed: str, path) -> float:
    """Catch the sum-vs-mean confusion; returns trace(C) / the key scale.

    A file cannot say whether it holds a sum or a mean: the two differ by the factor N (its token count) alone. The
    reference is the key scale of the model itself, E||k||^2 over a short fixed probe text (the key_scale job, one
    forward pass), which trace(C) = E||k||^2 over the corpus should match within a modest factor (another text,
    heavy-tailed norms). If the file holds the other kind, the ratio r = trace(C) / scale is off by N instead. The
    rule decides for the hypothesis nearer in log scale: the geometric midpoint of 1 and 1/N (or N) is 1/sqrt(N)
    (or sqrt(N)). claimed "sum" (ROME's mom2.mom2, divided by mom2.count): an error when r < 1/sqrt(N), i.e. the
    file is nearer to holding a mean already; checked against the probe's *median* ||k||^2 (smaller than its mean
    when a few attention-sink keys are large: the conservative side). claimed "mean" (a bare mean with the declared
    n_tokens): an error when r > sqrt(N), i.e. the file is nearer to holding a sum; checked against the probe's
    *mean* ||k||^2 (the larger one: again the conservative side). With N = 10^5 tokens, a real C would have to be
    300 times off the probe's scale to be refused.
    """
    trace = float(np.trace(C))
    limit = float(np.sqrt(n_tokens))
    if claimed == "sum":
        ratio = trace / float(key_scale["median"])
        if ratio < 1.0 / limit:
            raise ImportedStatisticsError(
                f"{path}: mom2.mom2 looks like a mean, not ROME's sum: trace(mom2.mom2 / mom2.count) = {trace:.3e} "
                f"is {ratio:.3e} times the model's median key norm^2 {key_scale['median']:.3e} on the probe text, "
                f"below 1/sqrt(mom2.count) = {1 / limit:.3e} (a mean divided by the count again would be about "
                f"1/{n_tokens} of it). Store the sum (mean x count) in mom2.mom2, or import the file as a bare mean "
                f"(source mean_npy)")
    elif claimed == "mean":
        ratio = trace / float(key_scale["mean"])
        if ratio > limit:
            raise ImportedStatisticsError(
                f"{path}: the file looks like a sum, not a mean: its trace {trace:.3e} is {ratio:.3e} times the "
                f"model's mean key norm^2 {key_scale['mean']:.3e} on the probe text, above sqrt(n_tokens) = "
                f"{limit:.3e} (a sum over the declared n_tokens = {n_tokens} would be about {n_tokens} times it). "
                f"Divide it by its token count, or check n_tokens")
    else:
        raise ValueError(f"claimed must be 'sum' or 'mean', got {claimed!r}")
    return ratio


def import_rome_npz(path: str | os.PathLike, *, d_m: int, key_scale: dict[str, float]
                    ) -> tuple[np.ndarray, dict[str, Any]]:
    """C = mom2.mom2 / mom2.count (float64) of a ROME statistics file, checked; and what the file says."""
    state = read_rome_npz(path)
    count = state["count"]
    C = state["sum"].astype(np.float64) / count
    checks = check_second_moment(C, d_m=d_m, path=path)
    ratio = check_sum_or_mean(C, count, key_scale, claimed="sum", path=path)
    C = (C + C.T) / 2  # exact for a symmetric sum (x + x and the halving are exact)
    info = {"format": "rome_npz", "count": count, "sample_size": state["sample_size"],
            "stored_dtype": state["stored_dtype"], "constructors": state["constructors"], "entries": state["entries"],
            "trace_over_key_scale": ratio, **checks}
    return C, info


def import_mean_npy(path: str | os.PathLike, *, d_m: int, n_tokens: int, key_scale: dict[str, float]
                    ) -> tuple[np.ndarray, dict[str, Any]]:
    """C of a bare .npy mean over the declared ``n_tokens``, checked."""
    try:
        stored = np.load(path, allow_pickle=False)
    except ValueError as err:
        raise ImportedStatisticsError(f"{path} cannot be read without pickle ({err}); refused") from None
    except (OSError, EOFError) as err:
        raise ImportedStatisticsError(f"{path} is not a readable .npy file ({err})") from None
    if not isinstance(stored, np.ndarray) or stored.dtype not in (np.float32, np.float64):
        raise ImportedStatisticsError(f"{path} holds {getattr(stored, 'dtype', type(stored).__name__)}, expected a "
                                      f"float32 or float64 matrix")
    if n_tokens is None or int(n_tokens) <= 0:
        raise ImportedStatisticsError(f"{path}: a bare mean needs its positive token count, got {n_tokens!r}")
    C = stored.astype(np.float64)
    checks = check_second_moment(C, d_m=d_m, path=path)
    ratio = check_sum_or_mean(C, int(n_tokens), key_scale, claimed="mean", path=path)
    C = (C + C.T) / 2
    info = {"format": "mean_npy", "count": int(n_tokens), "sample_size": None, "stored_dtype": str(stored.dtype),
            "constructors": {}, "entries": [], "trace_over_key_scale": ratio, **checks}
    return C, info


# A fixed, neutral probe text (four documents, so that several first positions count, as in a corpus): the key
# scale the sum-vs-mean check of imported statistics compares trace(C) with.
PROBE_TEXTS = (
    "The river rises in the hills north of the town and flows south through farmland before it joins the sea. "
    "Its valley has been settled since the Bronze Age, and a stone bridge from the twelfth century still stands.",
    "The company was founded in 1921 by two brothers who repaired bicycles. It later built motorcycles and small "
    "cars, and today it makes parts for trains and buses in three factories.",
    "In mathematics, a prime number is a natural number greater than one that has no divisors other than one and "
    "itself. There are infinitely many primes, as Euclid showed more than two thousand years ago.",
    "She studied music in Vienna and Paris, wrote four operas and many songs, and taught composition for thirty "
    "years. Her letters, published after her death, describe the musical life of the period.",
)


def probe_key_scale(model, tokenizer, layers: Sequence[int]) -> dict[int, dict[str, float]]:
    """Mean and median ||k||^2 over the probe texts' tokens for every layer (one forward pass, all real tokens)."""
    import torch

    encoded = [tokenizer(text)["input_ids"] for text in PROBE_TEXTS]
    ids, mask, positions = pad_batch([np.asarray(e) for e in encoded], tokenizer.pad_token_id or 0)
    device = next(model.parameters()).device
    norms: dict[int, np.ndarray] = {}
    bool_mask = mask.bool().to(device)

    def make_hook(layer):
        def hook(module, args):
            keys = args[0][bool_mask].to(torch.float64)
            norms[layer] = (keys * keys).sum(dim=-1).cpu().numpy()

        return hook

    handles = [key_module(model, layer).register_forward_pre_hook(make_hook(layer)) for layer in layers]
    try:
        with torch.inference_mode():
            model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device),
                             position_ids=positions.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    out = {}
    for layer in layers:
        values = norms[layer]
        if not np.isfinite(values).all() or not (values > 0).any():
            raise NonFiniteActivationError(f"layer {layer}: the probe keys are not finite or all zero")
        out[int(layer)] = {"mean": float(values.mean()), "median": float(np.median(values)),
                           "n_tokens": int(values.size)}
    return out
