"""matrices: G, P, Q, W and A of one layer."""

from __future__ import annotations

from .. import keys as keys_mod
from .. import matrices as matrices_mod
from .. import models
from .. import whitening as whitening_mod
from ..provenance import ProvenanceError, environment, read_json


def matrices(model_json: str, keys_path: str, whitening_path: str, selection_path: str, layer: int,
             out_h5: str) -> None:
    manifest = models.read_manifest(model_json)
    selection = read_json(selection_path)
    K_all, pool, key_attrs = keys_mod.read_keys(keys_path, model=models.identity(manifest), layer=layer, d_m=manifest["d_m"])
    if pool[: len(selection["selected"])] != selection["selected"]:
        raise ProvenanceError(f"{keys_path} holds keys of other facts than {selection_path} selects; rerun keys")
    m = len(selection["selected"])
    K = K_all[:m]
    w, w_attrs = whitening_mod.read_whitening(whitening_path, model=models.identity(manifest), layer=layer, d_m=manifest["d_m"])
    mats = matrices_mod.superposition_matrices(K, w.cholesky, selection["selected"])
    record = {**models.provenance_of(manifest), **environment(), "layer": layer, "ridge": w.ridge,
              "corpus_fingerprint": w_attrs["corpus_fingerprint"], "n_tokens": w_attrs["n_tokens"],
              "facts": selection["facts"]}
    matrices_mod.write_matrices(out_h5, mats, selection["selected"], record)
    off = matrices_mod.off_diagonal(mats["P"])
    print(f"layer {layer}: m={m}, off-diagonal P mean {off.mean():.4f}, max {off.max():.4f}")
