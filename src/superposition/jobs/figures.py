"""The figure rules: per model (heatmaps, densities, kurtosis vs m, editing) and across models (Figs. 3-6, size)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from .. import matrices as matrices_mod
from .. import models
from .. import plots
from ..provenance import read_table, write_table
from ..summaries import interference_separation, read_kdes


def _model(model_json: str, sizes: dict[str, float | None]) -> tuple[dict[str, Any], str, float]:
    """Manifest, label and size in millions of parameters (models.{name}.params_millions, else counted)."""
    manifest = models.read_manifest(model_json)
    params = sizes.get(manifest["name"]) or manifest["n_params"] / 1e6
    return manifest, plots.model_label(manifest["name"], params), params


def _by_size(model_jsons: Sequence[str], paths: Sequence[str], sizes: dict[str, float | None],
             read: Callable[[dict[str, Any], str, str], Any]) -> list[Any]:
    """``read(manifest, label, path)`` for every model, smallest model first."""
    items = []
    for model_json, path in zip(model_jsons, paths):
        manifest, label, params = _model(model_json, sizes)
        items.append((params, read(manifest, label, path)))
    return [item for _, item in sorted(items, key=lambda t: t[0])]


def _layer_text(layers: Sequence[int]) -> str:
    return f"layer {layers[0]}" if len(set(layers)) == 1 else "the first analysed layer"


def figure_heatmaps(model_json: str, matrix_paths: Sequence[str], layers: Sequence[int], sizes: dict,
                    png: str, pdf: str, dpi: int) -> None:
    manifest, label, _ = _model(model_json, sizes)
    Ps = {layer: matrices_mod.read_matrices(p, model=models.identity(manifest), layer=layer)[0]["P"]
          for layer, p in zip(layers, matrix_paths)}
    plots.heatmap_grid(Ps, label, png, pdf, dpi)


def figure_kde(model_json: str, kde_path: str, sizes: dict, png: str, pdf: str, dpi: int) -> None:
    manifest, label, _ = _model(model_json, sizes)
    kdes = read_kdes(kde_path, model=models.identity(manifest))
    plots.kde_per_layer(kdes["grid"], kdes["P"], label, png, pdf, dpi)


def figure_across_models(model_jsons: Sequence[str], matrix_paths: Sequence[str], layers: Sequence[int],
                         sizes: dict, png: str, pdf: str, dpi: int) -> None:
    """Fig. 3: the first analysed layer (layer 0 by default) of every model, ordered by size."""
    layer_of = dict(zip(matrix_paths, layers))

    def read(manifest, label, path):
        P = matrices_mod.read_matrices(path, model=models.identity(manifest), layer=layer_of[path])[0]["P"]
        return f"{label}, layer {layer_of[path]}", P

    plots.heatmaps_across_models(_by_size(model_jsons, matrix_paths, sizes, read), _layer_text(layers), png, pdf, dpi)


def figure_kde_across_models(model_jsons: Sequence[str], kde_paths: Sequence[str], sizes: dict, png: str, pdf: str,
                             dpi: int) -> None:
    """Fig. 4: the density of off-diagonal P at each model's first analysed layer."""
    def read(manifest, label, path):
        kdes = read_kdes(path, model=models.identity(manifest))
        layer = min(kdes["P"])
        return layer, kdes["grid"], (f"{label}, layer {layer}", kdes["P"][layer])

    panels = _by_size(model_jsons, kde_paths, sizes, read)
    plots.kde_across_models(panels[0][1], [p[2] for p in panels], _layer_text([p[0] for p in panels]), png, pdf, dpi)


def figure_angles(model_jsons: Sequence[str], kde_paths: Sequence[str], sizes: dict, png: str, pdf: str,
                  dpi: int) -> None:
    """Fig. 6: angles between keys at each model's last analysed layer, whitening vs activation space."""
    def read(manifest, label, path):
        kdes = read_kdes(path, model=models.identity(manifest))
        layer = max(kdes["W_angle"])
        return f"{label}, layer {layer}", kdes["angle_grid_deg"], kdes["W_angle"][layer], kdes["A_angle"][layer]

    plots.angle_distributions(_by_size(model_jsons, kde_paths, sizes, read), png, pdf, dpi)


def figure_kurtosis_vs_layer(model_jsons: Sequence[str], tables: Sequence[str], sizes: dict, png: str, pdf: str,
                             dpi: int, confidence: float | None = None) -> None:
    """Fig. 5: excess kurtosis of off-diagonal P by layer, every model."""
    def read(manifest, label, path):
        rows = read_table(path)
        return (label, np.array([int(r["layer"]) for r in rows]),
                np.array([float(r["P_excess_kurtosis"]) for r in rows]),
                *(_column(rows, f"P_excess_kurtosis_{part}") for part in ("ci_low", "ci_high")))

    plots.kurtosis_vs_layer(_by_size(model_jsons, tables, sizes, read), png, pdf, dpi, confidence)


def _column(rows: Sequence[dict[str, str]], name: str) -> np.ndarray:
    """A float column of a table; NaN where it is empty or absent (no interval for imported statistics)."""
    return np.array([float(r[name]) if r.get(name) not in (None, "") else np.nan for r in rows])


def figure_kurtosis_vs_size(model_jsons: Sequence[str], tables: Sequence[str], sizes: dict, png: str, pdf: str,
                            dpi: int) -> None:
    points = []
    for model_json, table in zip(model_jsons, tables):
        manifest, _, params = _model(model_json, sizes)
        rows = read_table(table)
        kurt = _column(rows, "P_excess_kurtosis")
        half = (_column(rows, "P_excess_kurtosis_ci_high") - _column(rows, "P_excess_kurtosis_ci_low")) / 2
        points.append((manifest["family"], manifest["name"], params, kurt[0], float(np.mean(kurt)), half[0],
                       float(np.mean(half))))
    plots.kurtosis_vs_size(points, png, pdf, dpi)


def figure_kurtosis_vs_m(model_json: str, table: str, sizes: dict, png: str, pdf: str, dpi: int) -> None:
    rows = read_table(table)
    series = []
    for layer in sorted({int(r["layer"]) for r in rows}):
        sel = [r for r in rows if int(r["layer"]) == layer]
        series.append((f"layer {layer}", np.array([int(r["m"]) for r in sel]),
                       np.array([float(r["P_excess_kurtosis"]) for r in sel]),
                       _column(sel, "subsets_q025"), _column(sel, "subsets_q975")))
    plots.kurtosis_vs_m(series, _model(model_json, sizes)[1], png, pdf, dpi)


def figure_editing(model_json: str, steps_tsv: str, facts_tsv: str, layer: int, sizes: dict, curves_png: str,
                   curves_pdf: str, scatter_png: str, scatter_pdf: str, separation_tsv: str, dpi: int) -> None:
    manifest, label, _ = _model(model_json, sizes)
    steps = read_table(steps_tsv)
    n = np.array([int(r["n_edits"]) for r in steps])
    # the methods are the steps table's column prefixes (closed_form_edit_success, null_space_edit_success, ...)
    methods = [c[: -len("_edit_success")] for c in steps[0] if c.endswith("_edit_success")]
    series = {}
    for method in methods:
        keys = ("edit_success", "retention", "logp_drop_mean") \
            + (("prediction_rel_error",) if f"{method}_prediction_rel_error" in steps[0] else ())
        series[method] = {key: np.array([float(r[f"{method}_{key}"]) if r[f"{method}_{key}"] else np.nan
                                         for r in steps]) for key in keys}
    plots.editing_curves(n, series, f"{label}, layer {layer}", curves_png, curves_pdf, dpi)
    # the prediction sum_i p(k_ei, k_j) delta_i exists for the closed-form updates only
    title = f"{label}, layer {layer}, {int(n[-1])} edits"
    retained = [r for r in read_table(facts_tsv) if r["role"] == "retained"]
    if "closed_form" not in methods:
        # the columns of the closed-form row, NaN: nothing predicted, so nothing to separate
        row = {"model": manifest["name"], "layer": layer, "n_edits": int(n[-1]), "method": "none",
               **interference_separation(np.zeros(0), np.zeros(0), np.zeros(0, dtype=bool)),
               "n_retained": len(retained)}
        write_table(separation_tsv, [row], list(row))
        message = (f"editing.methods is {methods}: without closed_form there is no\n"
                   f"interference predicted from P to compare with forgetting")
        print(message.replace("\n", " "))
        plots.no_prediction_figure(message, title, scatter_png, scatter_pdf, dpi)
        return
    interference = np.array([float(r["closed_form_relative_interference"]) for r in retained])
    logp_drop = np.array([float(r["closed_form_logp_drop"]) for r in retained])
    forgotten = np.array([r["closed_form_forgotten"] == "1" for r in retained])
    separation = interference_separation(interference, logp_drop, forgotten)
    row = {"model": manifest["name"], "layer": layer, "n_edits": int(n[-1]), "method": "closed_form", **separation}
    write_table(separation_tsv, [row], list(row))
    print(", ".join(f"{k} {v}" for k, v in row.items()))
    plots.interference_scatter(interference, logp_drop, forgotten, separation, title, scatter_png, scatter_pdf, dpi)


def figure_convergence(model_json: str, ladder_tsv: str, sizes: dict, png: str, pdf: str, dpi: int) -> None:
    """The convergence ladder of one model, marked at FastMEMIT's 10 d_k and at this run's N."""
    manifest, label, _ = _model(model_json, sizes)
    rows = read_table(ladder_tsv)
    full = max(float(r["tokens_per_dim"]) for r in rows)
    plots.convergence(rows, manifest["d_m"], label, png, pdf, dpi,
                      marks=[(10.0, "FastMEMIT's 10 d_k keys"), (full, "this run's N")])
