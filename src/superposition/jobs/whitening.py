"""whitening: spectrum and Cholesky factor of one layer's C."""

from __future__ import annotations

from .. import models
from .. import stats as stats_mod
from .. import whitening as whitening_mod
from ..provenance import environment


def whitening(model_json: str, covariance_path: str, layer: int, ridge: float, out_path: str) -> None:
    manifest = models.read_manifest(model_json)
    C, attrs = stats_mod.read_covariance(covariance_path, model=models.identity(manifest), layer=layer, d_m=manifest["d_m"])
    w = whitening_mod.whiten(C, ridge=ridge, layer=layer, n_tokens=attrs.get("n_tokens"))
    record = {**models.provenance_of(manifest), **environment(), "layer": layer,
              "corpus_fingerprint": attrs["corpus_fingerprint"], "n_tokens": attrs["n_tokens"]}
    whitening_mod.write_whitening(out_path, w, record)
    print(f"layer {layer}: eigenvalues {w.eigenvalues[0]:.3e}..{w.eigenvalues[-1]:.3e}, "
          f"condition number {w.condition_number:.3e}")
