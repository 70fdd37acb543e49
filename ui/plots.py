"""Plotly figures for the app: importance heatmaps, keep/drop views, training curves.

Only presentation lives here (ordering, bucketing for readability, colours); every score
comes from compact.importance and every keep/drop decision from compact.prune.plan.
Dropped cells are left empty (NaN) so the grey background shows through.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

MAX_NEURON_COLUMNS = 2048  # above this, sorted neurons are averaged in buckets
DROPPED = "#d0d0d0"
SCALE = "Viridis"


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _f32(x: np.ndarray) -> np.ndarray:
    """float32 halves what goes to the browser (Plotly sends numpy arrays as typed binary)."""
    return np.ascontiguousarray(x, dtype=np.float32)


def _layout(fig: go.Figure, title: str, height: int = 360) -> go.Figure:
    fig.update_layout(title=title, height=height, margin=dict(l=50, r=20, t=50, b=40),
                      plot_bgcolor=DROPPED, template="plotly_white")
    return fig


def _mask(shape: tuple[int, ...], kept_rows: Iterable[int] | None,
          kept_cols: Sequence[Iterable[int]] | Iterable[int] | None, per_row: bool) -> np.ndarray:
    """A boolean keep mask from kept row indices and kept column indices (per row or shared)."""
    mask = np.ones(shape, dtype=bool)
    if kept_cols is not None:
        if per_row:
            mask[:] = False
            for r, cols in enumerate(kept_cols):
                mask[r, list(cols)] = True
        else:
            cols = np.zeros(shape[1], dtype=bool)
            cols[list(kept_cols)] = True
            mask &= cols[None, :]
    if kept_rows is not None:
        rows = np.zeros(shape[0], dtype=bool)
        rows[list(kept_rows)] = True
        mask &= rows[:, None]
    return mask


def heads(scores, kept_layers=None, kept_heads=None) -> go.Figure:
    """Attention heads, layer x head; kept_heads is a list (per layer) of kept head indices."""
    z = _np(scores)
    mask = _mask(z.shape, kept_layers, kept_heads, per_row=True)
    shown = np.where(mask, z, np.nan)
    fig = go.Figure(go.Heatmap(
        z=shown, colorscale=SCALE, zmin=float(np.nanmin(z)), zmax=float(np.nanmax(z)),
        colorbar=dict(title="activation<br>score"),
        hovertemplate="layer %{y}, head %{x}<br>score %{z:.4g}<extra></extra>"))
    fig.update_xaxes(title="head", dtick=1)
    fig.update_yaxes(title="layer", autorange="reversed")
    title = "Attention heads" + (f" — keeping {int(mask.sum())} of {mask.size}" if not mask.all() else "")
    return _layout(fig, title)


def _log10(z: np.ndarray) -> np.ndarray:
    """Colours on a log scale: activation scores span orders of magnitude (a few outlier
    neurons and channels would otherwise paint everything else the same dark colour)."""
    positive = z[z > 0]
    floor = float(positive.min()) if positive.size else 1e-12
    return np.log10(np.maximum(z, floor))


def _colorbar_log(z: np.ndarray) -> dict:
    lo, hi = np.floor(np.nanmin(z)), np.ceil(np.nanmax(z))
    ticks = np.arange(lo, hi + 1)
    return dict(title="activation<br>score (log)", tickvals=ticks.tolist(),
                ticktext=[f"1e{int(t)}" for t in ticks])


def neurons(scores, kept_layers=None, kept_neurons=None, max_columns: int = MAX_NEURON_COLUMNS) -> go.Figure:
    """MLP neurons, layer x rank: each layer's neurons sorted by score, most important left.

    Sorting makes thousands of columns readable (the shape of each layer's curve shows); the
    hover gives the neuron's own index and score. Beyond max_columns, neighbouring ranks are
    averaged in buckets. Colours are log10 of the score.
    """
    z = _np(scores)
    layers, width = z.shape
    mask = _mask(z.shape, kept_layers, kept_neurons, per_row=True)
    order = np.argsort(-z, axis=1, kind="stable")
    zs = np.take_along_axis(z, order, axis=1)
    ms = np.take_along_axis(mask, order, axis=1)
    if width > max_columns:
        edges = np.linspace(0, width, max_columns + 1).astype(int)
        zs = np.add.reduceat(zs, edges[:-1], axis=1) / np.diff(edges)[None, :]
        ms = np.add.reduceat(ms.astype(float), edges[:-1], axis=1) / np.diff(edges)[None, :] >= 0.5
        custom = np.stack([np.broadcast_to(edges[:-1], zs.shape), np.broadcast_to(edges[1:] - 1, zs.shape),
                           order[:, edges[:-1]], zs], axis=-1)
        hover = ("layer %{y}, ranks %{customdata[0]}–%{customdata[1]}<br>mean score %{customdata[3]:.4g}"
                 "<br>top neuron #%{customdata[2]}<extra></extra>")
        x_title = f"neuron rank in layer (buckets of ~{width // max_columns})"
    else:
        custom = np.stack([order, zs], axis=-1)
        hover = ("layer %{y}, rank %{x}<br>neuron #%{customdata[0]}<br>score %{customdata[1]:.4g}"
                 "<extra></extra>")
        x_title = "neuron rank in layer (sorted by score)"
    colours = _log10(zs)
    fig = go.Figure(go.Heatmap(z=_f32(np.where(ms, colours, np.nan)), customdata=_f32(custom),
                               colorscale=SCALE,
                               hovertemplate=hover, zmin=float(colours.min()), zmax=float(colours.max()),
                               colorbar=_colorbar_log(colours)))
    fig.update_xaxes(title=x_title)
    fig.update_yaxes(title="layer", autorange="reversed")
    title = f"MLP neurons ({width} per layer)"
    if not mask.all():
        first_kept = 0 if kept_layers is None else list(kept_layers)[0]
        title += f" — keeping {int(mask[first_kept].sum())} per layer"
    return _layout(fig, title, height=380)


def channels(global_scores, per_layer=None, kept_channels=None, kept_layers=None) -> go.Figure:
    """Embedding (hidden) channels, ordered by global score; per layer when available."""
    g = _np(global_scores)
    order = np.argsort(-g, kind="stable")
    keep = np.ones(g.shape[0], dtype=bool)
    if kept_channels is not None:
        keep[:] = False
        keep[list(kept_channels)] = True
    if per_layer is not None:
        z = _np(per_layer)[:, order]
        mask = _mask(z.shape, kept_layers, None, per_row=False) & keep[order][None, :]
        colours = _log10(z)
        custom = np.stack([np.broadcast_to(order, z.shape), z], axis=-1)
        fig = go.Figure(go.Heatmap(
            z=_f32(np.where(mask, colours, np.nan)), customdata=_f32(custom), colorscale=SCALE,
            zmin=float(colours.min()), zmax=float(colours.max()), colorbar=_colorbar_log(colours),
            hovertemplate="layer %{y}, rank %{x}<br>channel #%{customdata[0]}<br>score %{customdata[1]:.4g}"
                          "<extra></extra>"))
        fig.update_yaxes(title="layer", autorange="reversed")
    else:
        colors = np.where(keep[order], "#3b528b", DROPPED)
        fig = go.Figure(go.Bar(y=g[order], customdata=order, marker_color=list(colors),
                               hovertemplate="rank %{x}<br>channel #%{customdata}<br>score %{y:.4g}"
                                             "<extra></extra>"))
        fig.update_yaxes(title="score", type="log")
    fig.update_xaxes(title="channel rank (sorted by overall score)")
    title = f"Embedding channels ({g.shape[0]})"
    if not keep.all():
        title += f" — keeping {int(keep.sum())}"
    return _layout(fig, title)


def layers(bi, ppl=None, kept_layers=None) -> go.Figure:
    """Layer importance: Block Influence (1 - cos(in, out)) and the perplexity when removed."""
    b = _np(bi)
    keep = np.ones(b.shape[0], dtype=bool)
    if kept_layers is not None:
        keep[:] = False
        keep[list(kept_layers)] = True
    colors = list(np.where(keep, "#3b528b", DROPPED))
    rows = 2 if ppl is not None else 1
    titles = ["Block Influence (higher = more important)"] + (
        ["Perplexity with the layer removed"] if ppl is not None else [])
    fig = make_subplots(rows=rows, cols=1, shared_xaxes=True, subplot_titles=titles, vertical_spacing=0.12)
    x = np.arange(b.shape[0])
    fig.add_trace(go.Bar(x=x, y=b, marker_color=colors, name="BI",
                         hovertemplate="layer %{x}<br>BI %{y:.4g}<extra></extra>"), row=1, col=1)
    if ppl is not None:
        fig.add_trace(go.Bar(x=x, y=_np(ppl), marker_color=colors, name="PPL",
                             hovertemplate="layer %{x}<br>ppl %{y:.4g}<extra></extra>"), row=2, col=1)
    fig.update_layout(showlegend=False)
    fig.update_xaxes(title="layer", row=rows, col=1)
    title = "Layer importance" + (f" — keeping {int(keep.sum())} of {keep.size}" if not keep.all() else "")
    _layout(fig, title, height=300 + 180 * (rows - 1))
    fig.update_layout(plot_bgcolor="white")
    return fig


def curves(events: list[dict], x: str, ys: Sequence[str], title: str, y_title: str = "",
           log_y: bool = False) -> go.Figure:
    """Line plot of event fields against one of them (e.g. loss, kd, ce against tokens)."""
    fig = go.Figure()
    for name in ys:
        pts = [(e[x], e[name]) for e in events if e.get(name) is not None and e.get(x) is not None]
        if pts:
            xs, vs = zip(*pts, strict=True)
            fig.add_trace(go.Scatter(x=list(xs), y=list(vs),
                                     mode="lines+markers" if len(pts) < 40 else "lines",
                                     name=name))
    fig.update_xaxes(title=x)
    fig.update_yaxes(title=y_title, type="log" if log_y else "linear")
    _layout(fig, title, height=320)
    fig.update_layout(plot_bgcolor="white")
    return fig


def bars(labels: Sequence[str], values: Sequence[float], title: str, y_title: str,
         y_range: tuple[float, float] | None = None) -> go.Figure:
    fig = go.Figure(go.Bar(x=list(labels), y=list(values),
                           hovertemplate="%{x}<br>%{y:.4g}<extra></extra>"))
    fig.update_yaxes(title=y_title, range=list(y_range) if y_range else None)
    _layout(fig, title, height=320)
    fig.update_layout(plot_bgcolor="white")
    return fig


def empty(title: str) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=title, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                       font=dict(size=14, color="#777"))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    fig.update_layout(height=240, margin=dict(l=10, r=10, t=10, b=10), template="plotly_white")
    return fig


def pareto(points: Sequence[tuple[float, float]], labels: Sequence[str], front: Sequence[int],
           refs: Sequence[str] | None = None, x_title: str = "parameters",
           y_title: str = "perplexity", title: str = "Size against perplexity") -> go.Figure:
    """Every model as a point (customdata: its reference, for a click to pick it), the frontier
    (no model both smaller and better) drawn as a line."""
    if not points:
        return empty("No scored model yet")
    hover = f"%{{text}}<br>%{{x:,}} {x_title}<br>ppl %{{y:.4g}}<extra></extra>"
    fig = go.Figure(go.Scatter(x=[p[0] for p in points], y=[p[1] for p in points], mode="markers",
                               text=list(labels), name="models", customdata=list(refs or labels),
                               marker={"size": 10}, hovertemplate=hover))
    refs = list(refs or labels)
    # The frontier passes through its points: a click there must name the model too.
    fig.add_trace(go.Scatter(x=[points[i][0] for i in front], y=[points[i][1] for i in front],
                             mode="lines", line={"shape": "hv"}, name="frontier",
                             customdata=[refs[i] for i in front], hoverinfo="skip"))
    fig.update_xaxes(title=x_title)
    # One degenerate model (perplexity 150k) must not flatten the rest: the axis stops at ten
    # times the median and points beyond it sit on the top edge, their value in the hover text.
    ys = sorted(p[1] for p in points)
    top = min(ys[-1], 10 * ys[len(ys) // 2])
    if top < ys[-1]:
        fig.data[0].y = [min(y, top) for y in fig.data[0].y]
        fig.data[0].text = [f"{t} (ppl {p[1]:.4g}, off the scale)" if p[1] > top else t
                            for t, p in zip(labels, points, strict=True)]
    fig.update_yaxes(title=y_title, type="log",
                     range=[math.log10(ys[0] * 0.9), math.log10(top * 1.1)])
    _layout(fig, title, height=360)
    fig.update_layout(plot_bgcolor="white")
    return fig


def overlay(series: dict[str, tuple[Sequence[float], Sequence[float]]], title: str,
            x_title: str = "tokens", y_title: str = "loss") -> go.Figure:
    """Several runs' curves on one plot, one trace per run."""
    fig = go.Figure()
    for name, (xs, ys) in series.items():
        if xs:
            fig.add_trace(go.Scatter(x=list(xs), y=list(ys), mode="lines", name=name))
    if not fig.data:
        return empty("No training curve among these runs")
    fig.update_xaxes(title=x_title)
    fig.update_yaxes(title=y_title)
    _layout(fig, title, height=320)
    fig.update_layout(plot_bgcolor="white")
    return fig


def weight_mask(weight, name: str, n: int, m: int, size: int = 128) -> go.Figure:
    """The top-left size x size block of one sparse weight (out x in): kept weights coloured by
    |w|, pruned ones left empty, so each group of m inputs shows its n kept cells. Zoom in to
    read single groups; the title says whether every group of the whole matrix holds n:m."""
    w = _np(weight)
    rows, cols = min(size, w.shape[0]), min(size, w.shape[1])
    block = np.abs(w[:rows, :cols])
    block[block == 0] = np.nan
    groups = (w.reshape(w.shape[0], -1, m) != 0).sum(-1) if w.shape[1] % m == 0 else None
    exact = groups is not None and bool((groups <= n).all())
    fig = go.Figure(go.Heatmap(z=_f32(block), colorscale=SCALE, colorbar=dict(title="|w|"),
                               hovertemplate="output %{y}, input %{x}<br>|w| %{z:.3g}<extra></extra>"))
    fig.update_xaxes(title=f"input (groups of {m}: x {m}k to {m}k + {m - 1})")
    fig.update_yaxes(title="output", autorange="reversed")
    verdict = f"every group of {m} keeps at most {n}" if exact else f"NOT {n}:{m} everywhere"
    return _layout(fig, f"{name}: rows 0-{rows - 1}, inputs 0-{cols - 1} of {w.shape[0]} x {w.shape[1]} "
                        f"(empty = pruned; {verdict})", height=480)


def mask_flips(events: list[dict]) -> go.Figure:
    """AST: per block, the share of its weights whose mask flipped at each mask update (top), and
    the decay on pruned weights lambda(t) (bottom), against the optimizer step."""
    updates = [e for e in events if e.get("flip_blocks")]
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.7, 0.3], vertical_spacing=0.08)
    if updates:
        z = np.array([e["flip_blocks"] for e in updates], dtype=np.float64).T  # block x update
        fig.add_trace(go.Heatmap(z=_f32(z), x=[e["step"] for e in updates], colorscale=SCALE,
                                 colorbar=dict(title="flipped", len=0.65, y=0.66),
                                 hovertemplate="step %{x}, block %{y}<br>%{z:.2%} flipped<extra></extra>"),
                      row=1, col=1)
    decay = [(e["step"], e["decay_lambda"]) for e in events if e.get("decay_lambda") is not None]
    if decay:
        fig.add_trace(go.Scatter(x=[s for s, _ in decay], y=[v for _, v in decay], mode="lines",
                                 name="decay λ(t)", showlegend=False), row=2, col=1)
    fig.update_yaxes(title="block", row=1, col=1)
    fig.update_yaxes(title="λ(t)", row=2, col=1)
    fig.update_xaxes(title="optimizer step", row=2, col=1)
    _layout(fig, "Mask flips per block at each mask update (top); decay on pruned weights (bottom)", 480)
    fig.update_layout(plot_bgcolor="white")
    return fig


def metrics_vs_truth(axes: dict[str, dict]) -> go.Figure:
    """Each importance metric (x) against the ablation truth (y: loss increase when the unit alone
    is removed), one row per axis checked, one column per metric; titles give Spearman's rho.

    axes: {axis: {"truth": array, "units": array, "metrics": {name: array}, "spearman": {name: rho}}}.
    """
    if not axes:
        return empty("Run importance with validation to compare its metrics with the truth")
    cols = max(len(a["metrics"]) for a in axes.values())
    titles = []
    for axis, a in axes.items():
        names = list(a["metrics"])
        titles += [f"{axis}: {n} (ρ = {a['spearman'].get(n, float('nan')):.2f})" for n in names]
        titles += [""] * (cols - len(names))
    fig = make_subplots(rows=len(axes), cols=cols, subplot_titles=titles, vertical_spacing=0.12,
                        horizontal_spacing=0.06)
    for r, (axis, a) in enumerate(axes.items(), start=1):
        truth, units = _np(a["truth"]), _np(a["units"]).astype(int)
        for c, (name, values) in enumerate(a["metrics"].items(), start=1):
            fig.add_trace(go.Scatter(
                x=_f32(_np(values)), y=_f32(truth), mode="markers", marker=dict(size=5), showlegend=False,
                customdata=units, hovertemplate=f"{axis[:-1]} #%{{customdata}}<br>{name} %{{x:.4g}}"
                                                "<br>loss increase %{y:.4g}<extra></extra>"), row=r, col=c)
        fig.update_yaxes(title_text="loss increase", row=r, col=1)
    _layout(fig, "Importance metrics against the truth (loss increase when the unit alone is removed)",
            height=260 * len(axes) + 80)
    fig.update_layout(plot_bgcolor="white")
    return fig
