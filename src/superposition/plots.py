"""The paper's figures, rebuilt from our artifacts. Each function writes one figure as PNG (report) and PDF (papers)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import matplotlib.ticker  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402

plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8,
                     "figure.constrained_layout.use": True})


def save(fig, png: str | Path, pdf: str | Path | None, dpi: int) -> None:
    from .provenance import atomic_path

    for path, kw in ((png, {"dpi": dpi}), (pdf, {})):
        if path is None:
            continue
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=Path(path).suffix[1:], **kw)
    plt.close(fig)


def model_label(name: str, params_millions: float | None) -> str:
    if not params_millions:
        return name
    size = f"{params_millions / 1000:.1f}B" if params_millions >= 1000 else f"{params_millions:.0f}M"
    return f"{name} ({size})"


def _grid_shape(n: int) -> tuple[int, int]:
    cols = min(n, 6)
    return math.ceil(n / cols), cols


def p_heatmap(ax, P: np.ndarray, title: str):
    image = ax.imshow(P, cmap="RdBu_r", norm=TwoSlopeNorm(vcenter=0.0, vmin=-1.0, vmax=1.0), interpolation="nearest")
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    return image


def heatmap_grid(Ps: dict[int, np.ndarray], model: str, png, pdf, dpi: int) -> None:
    """P of every layer of one model (rows: edited fact i, columns: affected fact j)."""
    rows, cols = _grid_shape(len(Ps))
    fig, axes = plt.subplots(rows, cols, figsize=(max(4.5, 1.9 * cols + 0.8), max(3.4, 1.9 * rows + 0.8)),
                             squeeze=False)
    image = None
    for ax, (layer, P) in zip(axes.flat, sorted(Ps.items())):
        image = p_heatmap(ax, P, f"layer {layer}")
    for ax in list(axes.flat)[len(Ps):]:
        ax.axis("off")
    m = next(iter(Ps.values())).shape[0]
    fig.suptitle(f"{model}: superposition matrix P over {m} facts, every layer")
    fig.colorbar(image, ax=axes, shrink=0.6, label="P[i, j] (clipped to [-1, 1])")
    save(fig, png, pdf, dpi)


def heatmaps_across_models(Ps: Sequence[tuple[str, np.ndarray]], layer_label: str, png, pdf, dpi: int) -> None:
    """The paper's Fig. 3: one layer of every model side by side, ordered by model size."""
    n = len(Ps)
    fig, axes = plt.subplots(1, n, figsize=(3.0 * n + 0.8, 3.3), squeeze=False)
    image = None
    for ax, (label, P) in zip(axes.flat, Ps):
        image = p_heatmap(ax, P, label)
    fig.suptitle(f"Superposition matrix P at {layer_label}")
    fig.colorbar(image, ax=axes, shrink=0.8, label="P[i, j]")
    save(fig, png, pdf, dpi)


def kde_per_layer(grid: np.ndarray, curves: dict[int, np.ndarray], model: str, png, pdf, dpi: int) -> None:
    """Density of the off-diagonal P entries, one curve per layer (colour = depth)."""
    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    layers = sorted(curves)
    cmap = plt.get_cmap("viridis")
    for layer in layers:
        ax.plot(grid, curves[layer], color=cmap(layer / max(1, layers[-1])), lw=1.0)
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(layers[0], max(layers[-1], layers[0] + 1)))
    fig.colorbar(sm, ax=ax, label="layer")
    ax.set_xlabel("off-diagonal P[i, j]")
    ax.set_ylabel("density")
    ax.set_title(f"{model}\noff-diagonal P at every layer (Gaussian KDE)")
    ax.axvline(0.0, color="0.6", lw=0.6, ls=":")
    save(fig, png, pdf, dpi)


def kde_across_models(grid: np.ndarray, curves: Sequence[tuple[str, np.ndarray]], layer_label: str, png, pdf,
                      dpi: int) -> None:
    """The paper's Fig. 4: density of off-diagonal P at one layer, one curve per model."""
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    for label, density in curves:
        ax.plot(grid, density, lw=1.4, label=label)
    ax.set_xlabel("off-diagonal P[i, j]")
    ax.set_ylabel("density")
    ax.set_title(f"Off-diagonal P at {layer_label} (Gaussian KDE)")
    ax.axvline(0.0, color="0.6", lw=0.6, ls=":")
    ax.legend(loc="upper right", frameon=False)
    save(fig, png, pdf, dpi)


def _interval_errors(values: np.ndarray, low: np.ndarray | None, high: np.ndarray | None) -> np.ndarray | None:
    """Asymmetric error bars (2 x n) from an interval; None where there is none (imported statistics)."""
    if low is None or high is None or not np.isfinite(low).any():
        return None
    return np.vstack([values - low, high - values])


def kurtosis_vs_layer(series: Sequence[tuple], png, pdf, dpi: int, confidence: float | None = None) -> None:
    """The paper's Fig. 5: excess kurtosis of off-diagonal P per layer, one line per model (legend by size).

    ``series``: (label, layers, kurtosis[, interval low, interval high]): the jackknife interval as error bars.
    """
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    for label, layers, kurt, *interval in series:
        errors = _interval_errors(kurt, *interval) if interval else None
        ax.errorbar(layers, kurt, yerr=errors, marker="o", ms=3, lw=1.2, capsize=2, elinewidth=0.8, label=label)
    ax.set_xlabel("layer" if confidence is None else
                  f"layer (error bars: {100 * confidence:g}% jackknife interval over corpus blocks)")
    ax.set_ylabel("excess kurtosis of off-diagonal P")
    ax.set_title("Kurtosis of the superposition distribution by layer")
    ax.axhline(0.0, color="0.6", lw=0.6, ls=":")
    ax.legend(frameon=False, loc="best")
    save(fig, png, pdf, dpi)


def angle_distributions(panels: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]], png, pdf,
                        dpi: int) -> None:
    """The paper's Fig. 6: angles between knowledge keys in whitening vs activation space, per model.

    ``panels``: (title, angle grid in degrees, density of whitening-space angles, density of activation angles).
    """
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(max(4.6, 3.6 * n), 3.6), squeeze=False, sharey=False)
    for ax, (title, grid, white, act) in zip(axes.flat, panels):
        ax.plot(grid, white, lw=1.4, label=r"whitening space: angle($C^{-1/2}k_i$, $C^{-1/2}k_j$)")
        ax.plot(grid, act, lw=1.4, label=r"activation space: angle($k_i$, $k_j$)")
        ax.axvline(90.0, color="0.6", lw=0.6, ls=":")
        ax.set_xlabel("angle between keys (degrees)")
        ax.set_ylabel("density")
        ax.set_title(title)
        ax.set_xlim(0, 180)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=2, frameon=False)
    fig.suptitle("Angles between knowledge keys at the last analysed layer")
    save(fig, png, pdf, dpi)


def kurtosis_vs_m(series: Sequence[tuple], model: str, png, pdf, dpi: int) -> None:
    """Kurtosis of off-diagonal P against the number of facts m, one line per layer (appendix C of the paper): the
    first m facts, and (``series`` items (label, m, kurtosis[, q2.5, q97.5])) the middle 95% over random subsets."""
    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    ticks: set[int] = set()
    for label, ms, kurt, *spread in series:
        line, = ax.plot(ms, kurt, marker="o", ms=3, lw=1.2, label=label)
        if spread and np.isfinite(spread[0]).any():  # the middle 95% over random fact subsets
            ax.fill_between(ms, spread[0], spread[1], color=line.get_color(), alpha=0.15, lw=0)
        ticks.update(int(m) for m in ms)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(ticks), [str(t) for t in sorted(ticks)])
    ax.minorticks_off()
    ax.set_xlabel("number of facts m (the largest: every known fact)")
    ax.set_ylabel("excess kurtosis of off-diagonal P")
    ax.set_title(f"{model}\nkurtosis of off-diagonal P vs number of facts")
    ax.legend(frameon=False, loc="best")
    save(fig, png, pdf, dpi)


def kurtosis_vs_size(points: Sequence[tuple], png, pdf, dpi: int) -> None:
    """Kurtosis against parameter count, one line per family (a family's sizes joined), two panels:
    the first analysed layer and the mean over all analysed layers.

    ``points``: (family, label, params in millions, first-layer kurtosis, mean kurtosis over layers[, first-layer
    interval half-width, mean of the layers' half-widths]): error bars (NaN: none). The mean's bar is an upper bound:
    the spread of a mean of correlated statistics is at most the mean of their spreads.
    """
    fig, axes = plt.subplots(1, 2, figsize=(8.0, 3.4), squeeze=False)
    families = sorted({p[0] for p in points})
    for family in families:
        mine = sorted((p for p in points if p[0] == family), key=lambda p: p[2])
        x = [p[2] * 1e6 for p in mine]
        for ax, column in zip(axes.flat, (3, 4)):
            half = [p[column + 2] if len(p) > 6 else np.nan for p in mine]
            ax.errorbar(x, [p[column] for p in mine], yerr=None if np.all(np.isnan(half)) else half, marker="o",
                        lw=1.2, capsize=2, elinewidth=0.8, label=family)
            for p in mine:
                ax.annotate(p[1], (p[2] * 1e6, p[column]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    sizes = sorted({p[2] for p in points})
    labels = [f"{v / 1000:.3g}B" if v >= 1000 else f"{v:.3g}M" for v in sizes]
    for ax, title in zip(axes.flat, ("first analysed layer", "mean over analysed layers")):
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks([v * 1e6 for v in sizes], labels)  # one tick per model size
        ax.margins(x=0.3, y=0.12)
        ax.set_xlabel("parameters (log scale)")
        ax.set_ylabel("excess kurtosis of off-diagonal P")
        ax.set_title(f"Kurtosis vs model size: {title}")
    axes.flat[0].legend(title="family", frameon=False, loc="best")
    save(fig, png, pdf, dpi)


METHOD_STYLE = {"closed_form": ("closed form (ROME)", "tab:red"),
                "null_space": ("null-space projected (AlphaEdit-style)", "tab:blue"),
                "control": ("interference-free control (min C-norm)", "tab:green"),
                "memit": ("MEMIT (batched, multi-layer)", "tab:purple")}


def editing_curves(n_edits: np.ndarray, series: dict[str, dict[str, np.ndarray]], title: str, png, pdf,
                   dpi: int) -> None:
    """Edit success, retention of unedited known facts and their mean drop of log p(true object) vs the number of
    sequential edits, one curve per method in ``series`` (any subset of the methods); where a method has a
    ``prediction_rel_error`` series (closed form: sum p delta; MEMIT: the keys-fixed (W_n - W_0) K_0), a fourth
    panel shows how far the measured change of the edited layer's output departs from that prediction."""
    predicted = {m: v["prediction_rel_error"] for m, v in series.items()
                 if "prediction_rel_error" in v and np.isfinite(v["prediction_rel_error"][1:]).any()}
    n_panels = 4 if predicted else 3
    fig, axes = plt.subplots(1, n_panels, figsize=(3.7 * n_panels, 3.2), sharex=True)
    for method, values in series.items():
        text, color = METHOD_STYLE.get(method, (method, None))
        axes[0].plot(n_edits[1:], values["edit_success"][1:], "o-", ms=3, color=color, label=text)
        axes[1].plot(n_edits, values["retention"], "o-", ms=3, color=color, label=text)
        axes[2].plot(n_edits, values["logp_drop_mean"], "o-", ms=3, color=color, label=text)
    for method, error in predicted.items():
        text, color = METHOD_STYLE.get(method, (method, None))
        axes[3].plot(n_edits[1:], error[1:], "o-", ms=3, color=color, label=text)
    if predicted:
        axes[3].set_yscale("log")
        axes[3].set_ylabel("|measured - predicted| / |measured|\nat the edited layer")
    axes[0].set_ylabel("edit success (target_new is the argmax)")
    axes[1].set_ylabel("retention (unedited facts still known)")
    axes[2].set_ylabel("mean drop of log p(true object)")
    for ax in axes[:2]:
        ax.set_ylim(-0.03, 1.03)
    for ax in axes:
        ax.set_xlabel("number of sequential edits")
        ax.grid(alpha=0.3)
    axes[2].axhline(0.0, color="black", lw=0.6)
    axes[1].legend(loc="lower left", fontsize="small")
    fig.suptitle(f"Lifelong editing: {title}")
    save(fig, png, pdf, dpi)


def no_prediction_figure(message: str, title: str, png, pdf, dpi: int) -> None:
    """A figure that says why there is nothing to plot (e.g. the configured methods have no prediction)."""
    fig, ax = plt.subplots(figsize=(5.6, 3.9))
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True)
    ax.set_title(title)
    save(fig, png, pdf, dpi)


def interference_scatter(predicted: np.ndarray, logp_drop: np.ndarray, forgotten: np.ndarray,
                         separation: dict[str, float], title: str, png, pdf, dpi: int) -> None:
    """Predicted interference ||sum_i p(k_ei, k_j) delta_i||, relative to the key's unedited output ||W_0 k_j||,
    vs the measured drop of log p(target_true); ``separation`` from editing.interference_separation."""
    fig, ax = plt.subplots(figsize=(5.6, 3.9))
    ax.scatter(predicted[~forgotten], logp_drop[~forgotten], s=9, alpha=0.6, color="tab:gray", label="still known")
    ax.scatter(predicted[forgotten], logp_drop[forgotten], s=12, alpha=0.8, color="tab:red", label="forgotten")
    if (predicted > 0).all():
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels collide on short ranges
    ax.axhline(0.0, color="black", lw=0.6)
    ax.set_xlabel(r"predicted interference $\|\sum_i p(k_{e_i},k_j)\,\delta_i\| \,/\, \|W_0 k_j\|$")
    ax.set_ylabel(r"drop of $\log p$(target_true)")
    ax.legend(loc="upper left")
    ax.set_title(f"{title}\nSpearman ρ = {separation['spearman_rho']:.2f} (n = {len(predicted)}), "
                 f"AUC forgotten vs kept = {separation['auc_forgotten_vs_kept']:.2f}")
    save(fig, png, pdf, dpi)


CONVERGENCE_PANELS = (
    ("P_excess_kurtosis", "excess kurtosis of off-diagonal P", "linear"),
    ("P_std", "std of off-diagonal P", "linear"),
    ("W_angle_mean_deg", "mean whitening angle (degrees)", "linear"),
    ("top_pairs_overlap", "top pairs of P shared with the full corpus", "linear"),
    ("P_relative_change", "||P_N - P|| / ||P||", "log"),
    ("C_relative_change", "||C_N - C|| / ||C||", "log"),
    ("condition_number", "condition number of C", "log"),
    ("null_space_fraction", "null-space share of d_m (dashed: relative)", "linear"),
)


def layer_groups(layers: Sequence[int], n_groups: int = 3) -> list[list[int]]:
    """The analysed layers cut into at most ``n_groups`` contiguous groups (early, middle, late)."""
    layers = sorted(layers)
    n = min(n_groups, len(layers))
    return [list(part) for part in np.array_split(np.asarray(layers), n)] if n else []


def convergence(rows: Sequence[dict[str, float]], d_m: int, model: str, png, pdf, dpi: int,
                marks: Sequence[tuple[float, str]] = ()) -> None:
    """The convergence ladder: one panel per statistic against tokens per key dimension N / d_m (log), a line per
    group of layers (the median over the group's layers at each N; the band: their range)."""
    layers = sorted({int(r["layer"]) for r in rows})
    fig, axes = plt.subplots(2, 4, figsize=(13.0, 6.0), squeeze=False)
    for ax, (name, label, scale) in zip(axes.flat, CONVERGENCE_PANELS):
        for group in layer_groups(layers):
            mine = [r for r in rows if int(r["layer"]) in group]
            x = np.array(sorted({float(r["tokens_per_dim"]) for r in mine}))

            def values(column, mine=mine, x=x):
                return np.array([[float(r[column]) / (d_m if column.startswith("null_space") else 1.0)
                                  for r in mine if int(r["layer"]) == layer] for layer in group])

            columns = ("null_space_dim", "null_space_dim_relative") if name == "null_space_fraction" else (name,)
            text = f"layers {group[0]}-{group[-1]}" if len(group) > 1 else f"layer {group[0]}"
            color = None
            for column, style in zip(columns, ("-", "--")):
                v = values(column)
                if scale == "log":  # the full corpus's distance to itself is 0: no point on a log axis
                    v = np.where(v > 0, v, np.nan)
                with np.errstate(all="ignore"), warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: a singular C at that N
                    line, = ax.plot(x, np.nanmedian(v, axis=0), style, marker="o", ms=2.5, lw=1.2, color=color,
                                    label=text if style == "-" else None)
                    color = line.get_color()  # the relative null space in the same colour, dashed
                    ax.fill_between(x, np.nanmin(v, axis=0), np.nanmax(v, axis=0), color=color, alpha=0.12, lw=0)
        for value, text in marks:
            ax.axvline(value, color="0.5", lw=0.7, ls=":")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_yscale(scale)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("tokens per key dimension, N / d_m")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), frameon=False)
    marks_text = "; ".join(f"{text} at N/d_m = {value:.3g}" for value, text in marks)
    fig.suptitle(f"{model}: statistics of nested corpus prefixes (dotted: {marks_text})", fontsize=10)
    save(fig, png, pdf, dpi)
