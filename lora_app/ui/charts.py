"""Plotly figures of a run's metrics, as the run store records them (one dict per logged step)."""

from __future__ import annotations

import math

import plotly.graph_objects as go

HEIGHT = 260
COLORS = dict(loss="#6366f1", smooth="#312e81", eval="#f97316", lr="#0ea5e9", grad="#10b981", rss="#6366f1",
              peak="#a855f7", cuda="#f97316", cuda_peak="#ef4444", estimate="#64748b")


def smooth(values: list[float], weight: float) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average, debiased so the start is not pulled to 0."""
    weight = min(max(float(weight or 0), 0.0), 0.999)
    out, last, n = [], 0.0, 0
    for value in values:
        n += 1
        last = last * weight + (1 - weight) * value
        out.append(last / (1 - weight ** n) if weight else value)
    return out


def _layout(fig: go.Figure, title: str, ytitle: str = "", log: bool = False) -> go.Figure:
    if not any(len(trace.x or ()) for trace in fig.data):  # an empty chart says why instead of showing bare axes
        fig.add_annotation(text="no data yet", showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                           font=dict(size=14, color="#94a3b8"))
        fig.update_xaxes(visible=False)
        fig.update_yaxes(visible=False)
    fig.update_layout(title=dict(text=title, x=0.01, font=dict(size=14)), height=HEIGHT,
                      margin=dict(l=55, r=15, t=36, b=36), xaxis_title="step", yaxis_title=ytitle,
                      legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1, font=dict(size=11)),
                      uirevision=title)  # keeps the user's zoom across the periodic redraws
    if log:
        fig.update_yaxes(type="log")
    return fig


def _series(metrics: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key``; a step logged twice (the final evaluation comes as a record of its
    own after the last step's) keeps its latest value."""
    points = {m["step"]: m[key] for m in metrics if m.get(key) is not None and math.isfinite(m[key])}
    return list(points), list(points.values())


def _events(fig: go.Figure, metrics: list[dict]) -> None:
    """What the run changed by itself (an out-of-memory recovery), as a dotted line at its step."""
    for m in metrics:
        if m.get("event"):
            fig.add_vline(x=m["step"], line_dash="dot", line_color=COLORS["cuda_peak"], annotation_text="out of memory"
                          if m["event"].startswith("out of memory") else "event", annotation_position="top left")


def loss_figure(metrics: list[dict], smoothing: float = 0.6, log_scale: bool = False) -> go.Figure:
    fig = go.Figure()
    steps, loss = _series(metrics, "loss")
    if loss:
        fig.add_trace(go.Scatter(x=steps, y=loss, name="train loss", mode="lines+markers" if len(loss) < 30 else "lines",
                                 line=dict(color=COLORS["loss"], width=1), opacity=0.35 if smoothing else 1))
        if smoothing:
            fig.add_trace(go.Scatter(x=steps, y=smooth(loss, smoothing), name="smoothed", mode="lines",
                                     line=dict(color=COLORS["smooth"], width=2)))
    steps, evals = _series(metrics, "eval_loss")
    if evals:
        fig.add_trace(go.Scatter(x=steps, y=evals, name="eval loss", mode="lines+markers",
                                 line=dict(color=COLORS["eval"], width=2), marker=dict(size=8)))
    _events(fig, metrics)
    return _layout(fig, "Loss", log=log_scale and bool(loss or evals))


def line_figure(metrics: list[dict], key: str, title: str, color: str, log_scale: bool = False) -> go.Figure:
    steps, values = _series(metrics, key)
    fig = go.Figure(go.Scatter(x=steps, y=values, name=title, mode="lines", line=dict(color=color, width=2)))
    fig.update_layout(showlegend=False)
    return _layout(fig, title, log=log_scale and bool(values))


def memory_figure(metrics: list[dict], estimate_bytes: float | None = None,
                  planned_bytes: float | None = None) -> go.Figure:
    """Measured memory (GiB) against the formula's estimate and the measured plan's prediction."""
    fig = go.Figure()
    gib = 2 ** 30
    for key, name in (("rss_bytes", "RSS"), ("peak_rss_bytes", "peak RSS"), ("cuda_allocated_bytes", "GPU allocated"),
                      ("cuda_reserved_bytes", "GPU reserved"), ("cuda_peak_bytes", "GPU peak")):
        steps, values = _series(metrics, key)
        if values:
            color = {"rss_bytes": "rss", "peak_rss_bytes": "peak", "cuda_allocated_bytes": "cuda",
                     "cuda_peak_bytes": "cuda_peak"}.get(key, "estimate")
            fig.add_trace(go.Scatter(x=steps, y=[v / gib for v in values], name=name, mode="lines",
                                     line=dict(color=COLORS[color], width=2)))
    if estimate_bytes:
        fig.add_hline(y=estimate_bytes / gib, line_dash="dash", line_color=COLORS["estimate"],
                      annotation_text="estimate", annotation_position="bottom right")
    if planned_bytes:
        fig.add_hline(y=planned_bytes / gib, line_dash="dot", line_color=COLORS["peak"],
                      annotation_text="plan (measured)", annotation_position="top left")
    _events(fig, metrics)
    return _layout(fig, "Memory (GiB)")


PALETTE = ("#6366f1", "#f97316", "#10b981", "#ef4444", "#0ea5e9", "#a855f7", "#eab308", "#64748b")


def probe_figure(metrics: list[dict], answers: list[dict]) -> go.Figure:
    """The losses beside what they should predict: the mean token F1 of the probe answers against
    their references at each step (right axis, 0 to 1)."""
    fig = go.Figure()
    for key, name, color in (("loss", "train loss", "loss"), ("eval_loss", "eval loss", "eval")):
        steps, values = _series(metrics, key)
        if values:
            fig.add_trace(go.Scatter(x=steps, y=values, name=name, mode="lines+markers" if key == "eval_loss" else "lines",
                                     line=dict(color=COLORS[color], width=2 if key == "eval_loss" else 1)))
    scored: dict[int, list[float]] = {}
    for answer in answers:
        if answer["score"] is not None:
            scored.setdefault(answer["step"], []).append(answer["score"])
    if scored:
        steps = sorted(scored)
        fig.add_trace(go.Scatter(x=steps, y=[sum(scored[s]) / len(scored[s]) for s in steps], name="answer F1",
                                 mode="lines+markers", yaxis="y2", line=dict(color=COLORS["grad"], width=2, dash="dot")))
        fig.update_layout(yaxis2=dict(title="token F1", overlaying="y", side="right", range=[0, 1]))
    fig = _layout(fig, "Losses and probe answer score", "loss")
    fig.update_layout(margin=dict(l=55, r=55, t=36, b=36))
    return fig


def rating_figure(series: dict[str, list[tuple[int, float]]]) -> go.Figure:
    """Blind-vote ratings (1000: an average answer) of each run's steps."""
    fig = go.Figure()
    for i, (name, points) in enumerate(series.items()):
        points = sorted(points)
        fig.add_trace(go.Scatter(x=[p[0] for p in points], y=[p[1] for p in points], name=name, mode="lines+markers",
                                 line=dict(color=PALETTE[i % len(PALETTE)], width=2), marker=dict(size=9)))
    if series:
        fig.add_hline(y=1000, line_dash="dash", line_color=COLORS["estimate"])
    return _layout(fig, "Blind-vote rating per step", "rating")


def overlay_figure(runs: list[tuple[str, list[dict]]]) -> go.Figure:
    """Several runs' loss (line) and eval loss (dashed, with markers) on one chart, a color per run."""
    fig = go.Figure()
    for i, (name, metrics) in enumerate(runs):
        color = PALETTE[i % len(PALETTE)]
        steps, loss = _series(metrics, "loss")
        fig.add_trace(go.Scatter(x=steps, y=loss, name=name, mode="lines", legendgroup=name,
                                 line=dict(color=color, width=2)))
        steps, evals = _series(metrics, "eval_loss")
        if evals:
            fig.add_trace(go.Scatter(x=steps, y=evals, name=f"{name} (eval)", mode="lines+markers", legendgroup=name,
                                     line=dict(color=color, width=2, dash="dash"), marker=dict(size=7)))
    fig = _layout(fig, "Loss of the selected runs (dashed: eval loss)", "loss")
    fig.update_layout(height=HEIGHT + 60)
    return fig
