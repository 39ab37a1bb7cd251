"""activation_stats: one forward pass over a corpus shard, the float64 sums of k k^T of a block of layers."""

from __future__ import annotations

from typing import Any, Sequence

from .. import corpus as corpus_mod
from .. import models
from .. import stats as stats_mod
from ..provenance import environment


def activation_stats(model_json: str, shard_path: str, layers: Sequence[int], stats_cfg: dict[str, Any],
                     out_path: str, checkpoint_path: str | None, execution: dict[str, Any] | None = None
                     ) -> dict[str, Any]:
    manifest = models.read_manifest(model_json)
    shard = corpus_mod.read_shard(shard_path, model=models.identity(manifest))
    model = models.load_model(manifest, stats_cfg["device"], stats_cfg["model_dtype"])
    record = {
        **models.provenance_of(manifest),
        **environment(),
        "corpus_id": shard.attrs["corpus_id"],
        "corpus_fingerprint": shard.attrs["corpus_fingerprint"],
        "shard_fingerprint": shard.attrs["token_fingerprint"],
        "shard": shard.attrs["shard"],
        "n_shards": shard.attrs["n_shards"],
        "execution": execution or {},
    }
    targets, block_targets = corpus_mod.segment_targets(int(shard.attrs["corpus_tokens"]),
                                                         int(stats_cfg["corpus_blocks"]), int(manifest["d_m"]))
    segments, segment_blocks = corpus_mod.document_segments([len(d) for d in shard.docs],
                                                            int(shard.attrs["token_offset"]), targets, block_targets)
    record.update({"corpus_blocks": int(stats_cfg["corpus_blocks"]), "segment_targets": targets,
                   "block_targets": block_targets, "corpus_tokens": int(shard.attrs["corpus_tokens"])})
    return stats_mod.collect_second_moments(
        model, shard.docs, layers, out_path, record,
        pad_id=models.pad_token_id(model.config),
        options=stats_mod.StatsOptions.from_config(stats_cfg),
        segments=segments,
        segment_blocks=segment_blocks,
        checkpoint_path=checkpoint_path,
    )
