"""Memory and time of each job from the model's size: what a cluster job asks for, and which plans cannot fit.

Pure arithmetic on numbers from the config (``params_millions``, ``n_layers``, ``d_m``), an existing snapshot
manifest (its exact ``d_m`` and parameter count) and the corpus (tokens per shard); imported by
``rules/common.smk`` while Snakemake builds the DAG, so no numpy or torch. Every figure is an upper bound that
errs on the large side; the SLURM profile's ``retries: 1`` doubles it (``attempt``) when a job still runs out.

The GPU memory of one statistics job (one corpus shard through one block of layers, ``superposition.stats``),
as that code allocates it::

    weights      params x bytes of stats.model_dtype (2 for bfloat16/float16, 4 for float32)
    accumulators layers in the block x d_m^2 x 8 bytes: the float64 sum of every layer, allocated before the
                 first batch and held to the end
    Gram buffer  d_m^2 x bytes of stats.gram_dtype: one layer's batch product K^T K (computed in panels of its
                 upper triangle, one layer at a time: this bounds the panels)
    keys         3 x max_tokens_per_batch x d_m x 4 bytes: one layer's keys, their transposed copy, the MLP's
                 activations
    workspace    2 GB: CUDA context, the rest of one forward batch, allocator slack

A plan whose total exceeds the GPU memory (``gpu_memory_gb``) is refused when the DAG is built, with the largest
block size that fits (``check_blocks``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

MB = 1000**2
GB = 1000**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GPU_WORKSPACE = 2 * GB
# Host memory every job needs before its data: Python, torch and transformers imported (model jobs), or numpy,
# scipy and h5py (the per-layer jobs).
MODEL_JOB_BASE = 3 * GB
NUMPY_JOB_BASE = 1 * GB
# Throughput assumed for the runtimes (conservative for an A100/H100; the retry doubles the time):
GPU_FLOPS = 50e12  # forward passes in bfloat16/float16: 2 x params flops per token
GPU_FLOPS_FP32 = 10e12  # forward passes in float32, and the float32 Gram products (2 x d_m^2 flops per token, layer)
CPU_FLOPS = 20e9  # one CPU core: eigendecompositions (about 10 d_m^3 flops) and matrix products
DISK_BYTES_PER_S = 200 * MB  # reading and writing HDF5 files on a shared file system
MIN_RUNTIME_MIN = 10
# Tokens per document where the corpus has not been tokenised yet and the config sets no max_length.
DEFAULT_TOKENS_PER_DOCUMENT = 1024
DEFAULT_DOCUMENTS = 100_000  # corpus.n_documents: null (all documents of an unknown corpus)


# A job of a model whose size nothing tells (no params_millions, d_m or snapshot yet): these fixed sizes.
UNKNOWN_SIZE_JOB = {"mem_mb": 8000, "runtime": 120}


class SizingError(ValueError):
    """A plan that cannot fit the requested GPU memory."""


@dataclass(frozen=True)
class ModelSize:
    """What the sizes depend on. ``d_m_from`` says where d_m came from: snapshot, config or estimate."""

    name: str
    params: float  # parameter count
    n_layers: int
    d_m: int
    d_m_from: str = "snapshot"

    @property
    def exact(self) -> bool:
        return self.d_m_from != "estimate"


def estimate_d_m(params_millions: float, n_layers: int) -> int:
    """MLP width of a transformer of this size when nothing says it: 12 n_layers d^2 parameters, d_m = 4 d.

    An overestimate for gated MLPs (Llama: 20,830 for Llama-2-13B, whose d_m is 13,824), so a size planned from it
    is on the safe side; set ``models.<name>.d_m`` for the exact one before the snapshot exists.
    """
    d_model = math.sqrt(params_millions * 1e6 / (12 * n_layers))
    return int(math.ceil(4 * d_model / 64) * 64)


def model_size(name: str, *, params_millions: float | None, n_layers: int, config_d_m: int | None = None,
               manifest: dict | None = None) -> ModelSize:
    """The model's size from its snapshot manifest when there is one, else from its config entry."""
    if manifest:
        return ModelSize(name, float(manifest.get("n_params") or (params_millions or 0) * 1e6 or
                                     _params_from_shape(manifest["n_layers"], manifest["d_m"])),
                         int(manifest["n_layers"]), int(manifest["d_m"]), "snapshot")
    if config_d_m:
        params = params_millions * 1e6 if params_millions else _params_from_shape(n_layers, config_d_m)
        return ModelSize(name, params, n_layers, int(config_d_m), "config")
    if not params_millions:
        raise SizingError(f"{name}: neither params_millions, d_m nor a snapshot tells its size; set "
                          f"models.{name}.params_millions (or models.{name}.d_m)")
    return ModelSize(name, params_millions * 1e6, n_layers, estimate_d_m(params_millions, n_layers), "estimate")


def _params_from_shape(n_layers: int, d_m: int) -> float:
    return 12 * n_layers * (d_m / 4) ** 2


# ------------------------------------------------------------------------------------- statistics jobs


def _schema_default(key: str):
    """A dataclass field whose default is the schema's for stats.``key`` (read when an instance is made)."""
    from . import settings

    return field(default_factory=lambda: settings.default(f"stats.{key}"))


@dataclass(frozen=True)
class StatsSettings:
    """The stats.* keys the statistics job's memory depends on (of the same names; defaults: the schema's)."""

    model_dtype: str = _schema_default("model_dtype")
    gram_dtype: str = _schema_default("gram_dtype")
    max_tokens_per_batch: int = _schema_default("max_tokens_per_batch")
    corpus_blocks: int = _schema_default("corpus_blocks")

    @classmethod
    def from_config(cls, stats: dict | None) -> "StatsSettings":
        """From a stats section; a key it lacks takes the schema's default."""
        values = {name: stats[name] for name in cls.__dataclass_fields__ if name in (stats or {})}
        for name in ("max_tokens_per_batch", "corpus_blocks"):
            if name in values:
                values[name] = int(values[name])
        return cls(**values)


def n_segments(tokens_total: int, corpus_blocks: int, d_m: int) -> int:
    """Corpus segments (superposition.corpus.segment_targets): the blocks and the halvings of the first down to d_m."""
    if corpus_blocks <= 1:
        return 1
    halvings = max(0, int(math.floor(math.log2(max(1.0, tokens_total / corpus_blocks / d_m)))))
    return corpus_blocks + halvings


def stats_gpu_bytes(size: ModelSize, block_layers: int, stats: StatsSettings = StatsSettings()) -> dict[str, int]:
    """GPU memory of one statistics job over ``block_layers`` layers: the parts and their total (bytes)."""
    parts = {
        "weights": int(size.params * DTYPE_BYTES[stats.model_dtype]),
        "accumulators": block_layers * size.d_m**2 * 8,
        "gram": size.d_m**2 * DTYPE_BYTES[stats.gram_dtype] if stats.gram_dtype in DTYPE_BYTES else size.d_m**2 * 8,
        "keys": 3 * stats.max_tokens_per_batch * size.d_m * 4,
        "workspace": GPU_WORKSPACE,
    }
    return {**parts, "total": sum(parts.values())}


def largest_block(size: ModelSize, gpu_bytes: float, stats: StatsSettings = StatsSettings()) -> int:
    """The most layers one statistics job can hold in ``gpu_bytes`` (0: not even one layer next to the weights)."""
    fixed = stats_gpu_bytes(size, 0, stats)["total"]
    return max(0, min(size.n_layers, int((gpu_bytes - fixed) // (size.d_m**2 * 8))))


def check_blocks(size: ModelSize, blocks: dict[str, int], gpu_memory_gb: float,
                 stats: StatsSettings = StatsSettings()) -> None:
    """Refuse a plan whose statistics blocks (name -> layer count) do not fit one GPU of ``gpu_memory_gb`` GB."""
    gpu = gpu_memory_gb * GB
    for name, n in blocks.items():
        need = stats_gpu_bytes(size, n, stats)
        if need["total"] <= gpu:
            continue
        fits = largest_block(size, gpu, stats)
        advice = (f"set models.{size.name}.layer_block_size: {fits} (or a GPU with more memory)" if fits else
                  "even one layer does not fit next to the weights: use a GPU with more memory or a smaller "
                  "stats.model_dtype")
        raise SizingError(
            f"{size.name}: the statistics block {name} ({n} layers, d_m {size.d_m}) needs {need['total']:,} bytes "
            f"({need['total'] / GB:.1f} GB: weights {need['weights'] / GB:.1f} GB in {stats.model_dtype}, float64 "
            f"accumulators {need['accumulators'] / GB:.1f} GB = {n} x {size.d_m}^2 x 8 bytes, Gram buffer and keys "
            f"{(need['gram'] + need['keys']) / GB:.1f} GB, workspace {need['workspace'] / GB:.0f} GB) but "
            f"gpu_memory_gb is "
            f"{gpu_memory_gb:g} ({int(gpu):,} bytes); {advice}. Existing statistics blocks are reused: delete "
            f"results/stats/{size.name}/ to replan them.")


def shard_tokens(corpus: dict, n_shards: int, context_length: int | None = None,
                 corpus_manifest: dict | None = None) -> int:
    """Tokens of one corpus shard: counted when the corpus is tokenised, else n_documents x tokens per document."""
    if corpus_manifest and corpus_manifest.get("corpus_tokens"):
        return int(math.ceil(corpus_manifest["corpus_tokens"] / n_shards))
    if corpus.get("n_tokens"):  # a token budget: the corpus holds that many (and up to one document more)
        return int(math.ceil(corpus["n_tokens"] / n_shards))
    per_doc = corpus.get("max_length") or context_length or DEFAULT_TOKENS_PER_DOCUMENT
    documents = corpus.get("n_documents") or DEFAULT_DOCUMENTS
    return int(math.ceil(documents * per_doc / n_shards))


def _minutes(seconds: float) -> int:
    return max(MIN_RUNTIME_MIN, int(math.ceil(seconds / 60)))


def _mb(n_bytes: float) -> int:
    return int(math.ceil(n_bytes / MB / 100) * 100)


def stats_job(size: ModelSize, block_layers: int, tokens: int, stats: StatsSettings = StatsSettings()
              ) -> dict[str, int]:
    """Host memory (MB) and runtime (minutes) of one statistics job.

    Host memory: the weights pass through it while loading (float32 on disk: 4 bytes a parameter at most), later
    the float64 sums are copied to it for every checkpoint and the output (every layer's, and three d_m x d_m
    temporaries while one layer is symmetrised): the larger of the two. Time: the forward up to the block's last
    layer (2 x params flops a token, at most the whole model) plus the Gram products (2 x d_m^2 a token and layer),
    twice over for the padding and the hooks.
    """
    # a finished segment's packed sums (d_m^2 / 2 float64 a layer) pass through the host on their way to their own
    # file beside the checkpoint: one segment at a time, however many the corpus is cut into
    segment = block_layers * size.d_m**2 * 4 if stats.corpus_blocks > 1 else 0
    host = MODEL_JOB_BASE + max(size.params * 4, (block_layers + 3) * size.d_m**2 * 8 + segment)
    flops = GPU_FLOPS if stats.model_dtype != "float32" else GPU_FLOPS_FP32
    seconds = 2 * tokens * (2 * size.params / flops + block_layers * 2 * size.d_m**2 / GPU_FLOPS_FP32)
    return {"mem_mb": _mb(host), "runtime": _minutes(seconds + size.params * 4 / DISK_BYTES_PER_S)}


def snapshot_job(size: ModelSize) -> dict[str, int]:
    """Host memory and time of a snapshot: a GGUF model is dequantised to float32 and saved (twice its size)."""
    weights = size.params * 4
    return {"mem_mb": _mb(MODEL_JOB_BASE + 2 * weights), "runtime": _minutes(3 * weights / DISK_BYTES_PER_S)}


def corpus_job(size: ModelSize, tokens_total: int) -> dict[str, int]:
    """Tokenisation: the token ids (int64) and offsets of every shard in memory, about 20 us a token on one core."""
    return {"mem_mb": _mb(MODEL_JOB_BASE + tokens_total * 8 * 3), "runtime": _minutes(tokens_total * 20e-6)}


def layer_jobs(size: ModelSize, n_shards: int, segments: int = 16) -> dict[str, dict[str, int]]:
    """covariance, whitening, matrices and resampling of one layer: host memory (MB) and runtime (minutes) each;
    ``segments``: the corpus segments of the statistics (n_segments)."""
    square = size.d_m**2 * 8  # one float64 d_m x d_m matrix
    return {
        # the running sum, the shard being read and the written C
        "covariance": {"mem_mb": _mb(NUMPY_JOB_BASE + 3 * square),
                       "runtime": _minutes(n_shards * square / DISK_BYTES_PER_S * 2)},
        # scipy.linalg.eigh: the input, its copy, the eigenvectors and LAPACK's workspace; about 10 d_m^3 flops
        "whitening": {"mem_mb": _mb(NUMPY_JOB_BASE + 6 * square),
                      "runtime": _minutes(10 * size.d_m**3 / CPU_FLOPS + 4 * square / DISK_BYTES_PER_S)},
        # W (d_m x d_m) read, the m keys whitened: a few d_m^2 products
        "matrices": {"mem_mb": _mb(NUMPY_JOB_BASE + 3 * square),
                     "runtime": _minutes(2 * square / DISK_BYTES_PER_S + 512 * size.d_m**2 * 2 / CPU_FLOPS)},
        # every segment (packed, half a square) and block sum of the layer, a few full squares; a Cholesky (d_m^3 / 3
        # flops) per replicate and an eigendecomposition per ladder point
        "resampling": {"mem_mb": _mb(NUMPY_JOB_BASE + 2 * segments * square / 2 + 6 * square),
                       "runtime": _minutes(segments * square / 2 / DISK_BYTES_PER_S
                                           + 2 * segments * 10 * size.d_m**3 / CPU_FLOPS)},
    }


def paper_table(sizes: Sequence[ModelSize], blocks: dict[str, int], gpu_memory_gb: float, stats: StatsSettings,
                tokens: dict[str, int], n_shards: int) -> str:
    """A Markdown table of the sizes of each model's jobs (profiles/slurm/README.md shows the paper's)."""
    lines = ["| model | d_m | block | GPU memory of a block | largest block that fits | activation_stats "
             "host memory, time | whitening memory, time |", "|---|---|---|---|---|---|---|"]
    for size in sizes:
        n = blocks[size.name]
        need = stats_gpu_bytes(size, n, stats)
        job = stats_job(size, n, tokens[size.name], stats)
        white = layer_jobs(size, n_shards)["whitening"]
        lines.append(
            f"| {size.name} | {size.d_m} | {n} | {need['total'] / GB:.1f} GB (weights {need['weights'] / GB:.1f} + "
            f"accumulators {need['accumulators'] / GB:.1f}) | {largest_block(size, gpu_memory_gb * GB, stats)}"
            f" | {job['mem_mb'] / 1000:.1f} GB, {job['runtime']} min | {white['mem_mb'] / 1000:.1f} GB, "
            f"{white['runtime']} min |")
    return "\n".join(lines)


def config_table(config: dict, gpu_memory_gb: float) -> str:
    """``paper_table`` for a config before anything is downloaded (sizes from its entries; blocks from
    layer_block_size, all analysed layers of a model being its n_layers)."""
    stats = StatsSettings.from_config(config.get("stats"))
    corpus = config.get("corpus") or {}
    n_shards = int(corpus.get("n_shards", 1))
    sizes, blocks, tokens = [], {}, {}
    for name, entry in config["models"].items():
        size = model_size(name, params_millions=entry.get("params_millions"), n_layers=int(entry["n_layers"]),
                          config_d_m=entry.get("d_m"))
        sizes.append(size)
        blocks[name] = int(entry.get("layer_block_size") or (config.get("stats") or {}).get("layer_block_size")
                           or entry["n_layers"])
        tokens[name] = shard_tokens(corpus, n_shards)
    return paper_table(sizes, blocks, gpu_memory_gb, stats, tokens, n_shards)
