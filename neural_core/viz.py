"""Views of an analysis as pictures: pure functions from numpy arrays (and analysis objects) to RGB ``uint8`` arrays
of shape ``(H, W, 3)``, plus plotly figures for the fused graph, the attributions and the reader analytics.

Nothing here touches a UI toolkit, a file or the network, so every function is testable on its own.

Conventions: *high salience is hot* (OpenCV's JET or INFERNO colour map); patch ``(r, c)`` covers rows
``r*P .. (r+1)*P`` and columns ``c*P .. (c+1)*P`` of the source image (clipped at the edges); a *display* image may
be a scaled copy of the source, and ``scale = display_width / source_width``.
"""
from __future__ import annotations

import base64
import math
from typing import Iterable

import cv2
import numpy as np

__all__ = [
    "COLORMAPS", "display_window", "display_grey", "to_rgb", "fit", "original", "colorbar", "heatmap_overlay",
    "salience_overlay",
    "token_overlay", "retained_patches", "patch_grid_overlay", "pixel_to_patch", "mask_to_patches", "clean_tokens", "token_focus", "graph_figure", "attribution_figure", "bar_figure",
    "histogram_figure", "empty_figure",
]

COLORMAPS = {"jet": cv2.COLORMAP_JET, "inferno": cv2.COLORMAP_INFERNO}

KEPT_RGB = (40, 220, 90)        # outline of kept patches
MISSED_RGB = (255, 150, 0)      # reader: "the model should have kept this"
IRRELEVANT_RGB = (235, 40, 60)  # reader: "the model kept this, but it is irrelevant"


# ---------------------------------------------------------------------------------------------------------- basics

def display_window(raw: np.ndarray, bit_depth: int) -> tuple[float, float]:
    """The ``(low, high)`` raw values mapped to black and white for display.

    8-bit images and deeper images that use at least a quarter of their range are shown linearly over the whole
    range ``[0, 2**bit_depth - 1]``; a deeper image using less (a 12-bit detector in a 16-bit container) is windowed
    to its 0.5-99.5 percentiles instead, so it is not shown black.
    """
    a = np.asarray(raw)
    top = float(2 ** int(bit_depth) - 1)
    if int(bit_depth) <= 8 or a.size == 0:
        return 0.0, top
    lo, hi = float(a.min()), float(a.max())
    if hi - lo >= 0.25 * top:
        return 0.0, top
    sample = a[:: max(1, a.shape[0] // 512), :: max(1, a.shape[1] // 512)]
    lo, hi = (float(v) for v in np.percentile(sample, (0.5, 99.5)))
    if hi <= lo:
        lo, hi = float(a.min()), float(max(a.max(), a.min() + 1))
    return lo, hi


def display_grey(raw: np.ndarray, bit_depth: int, window: tuple[float, float] | None = None) -> np.ndarray:
    """An integer radiograph (``XRay.raw``) as 8-bit grey for display, over ``window`` (default
    :func:`display_window`)."""
    a = np.asarray(raw)
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D grey image, got shape {a.shape}")
    lo, hi = display_window(a, bit_depth) if window is None else window
    if a.dtype == np.uint8 and (lo, hi) == (0.0, 255.0):
        return a.copy()
    return _scale_to_u8(a.astype(np.float32), float(lo), float(hi))


def _scale_to_u8(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
    out = (a - lo) * (255.0 / max(hi - lo, 1e-6))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def to_rgb(img: np.ndarray) -> np.ndarray:
    """Grey ``(H, W)`` or RGB(A) ``(H, W, 3|4)`` uint8 -> RGB ``(H, W, 3)`` uint8."""
    a = np.asarray(img)
    if a.dtype != np.uint8:
        raise ValueError(f"expected uint8, got {a.dtype}")
    if a.ndim == 2:
        return np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim == 3 and a.shape[2] == 3:
        return a
    if a.ndim == 3 and a.shape[2] == 4:
        return np.ascontiguousarray(a[:, :, :3])
    raise ValueError(f"expected a grey or RGB image, got shape {a.shape}")


def fit(img: np.ndarray, max_side: int | None) -> tuple[np.ndarray, float]:
    """Downscale (area interpolation) so the longer side is at most ``max_side``; never upscales.
    Returns ``(image, scale)`` with ``scale = new_width / old_width``."""
    h, w = img.shape[:2]
    if not max_side or max(h, w) <= max_side:
        return img, 1.0
    s = float(max_side) / max(h, w)
    nw, nh = max(1, int(round(w * s))), max(1, int(round(h * s)))
    return cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA), nw / w


def original(xray, max_side: int | None = None) -> np.ndarray:
    """The radiograph as RGB uint8 (optionally downscaled to ``max_side``)."""
    grey = display_grey(xray.raw, xray.meta.bit_depth)
    return to_rgb(fit(grey, max_side)[0])


# ---------------------------------------------------------------------------------------------------------- heatmaps

def _font_scale(height: int) -> float:
    return float(np.clip(height / 900.0, 0.32, 1.2))


def colorbar(height: int, width: int | None = None, *, colormap: str = "jet", label: str = "salience"
             ) -> np.ndarray:
    """A vertical colour-bar legend ``(height, width, 3)``: the colour map from 1 ("high", top) to 0 ("low",
    bottom) on a dark panel, with its label."""
    if colormap not in COLORMAPS:
        raise ValueError(f"colormap must be one of {sorted(COLORMAPS)}, got {colormap!r}")
    height = int(height)
    width = int(width or max(44, round(height * 0.11)))
    panel = np.full((height, width, 3), 24, dtype=np.uint8)
    fs = _font_scale(height)
    th = max(1, int(round(fs * 1.6)))
    text_h = int(round(22 * fs)) + 6
    top, bottom = text_h + 4, height - text_h - 4
    bar_w = max(8, width // 3)
    x0 = (width - bar_w) // 2
    if bottom - top >= 8:
        ramp = np.linspace(255, 0, bottom - top).astype(np.uint8)[:, None]
        col = cv2.applyColorMap(np.repeat(ramp, bar_w, axis=1), COLORMAPS[colormap])
        panel[top:bottom, x0:x0 + bar_w] = col[:, :, ::-1]
        cv2.rectangle(panel, (x0 - 1, top - 1), (x0 + bar_w, bottom), (200, 200, 200), 1)
    for text, y in (("high", top - 6), ("low", height - 6)):
        (tw, _), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, fs, th)
        cv2.putText(panel, text, (max(1, (width - tw) // 2), max(text_h - 4, y)), cv2.FONT_HERSHEY_SIMPLEX, fs,
                    (235, 235, 235), th, cv2.LINE_AA)
    if label and bottom - top > 60:
        # the label, written vertically beside the bar when there is room
        (lw, lh), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, fs * 0.8, th)
        if lw < bottom - top and x0 > lh + 2:
            strip = np.zeros((lh + 6, lw + 4, 3), dtype=np.uint8)
            strip[:] = 24
            cv2.putText(strip, label, (2, lh + 2), cv2.FONT_HERSHEY_SIMPLEX, fs * 0.8, (180, 180, 180), th,
                        cv2.LINE_AA)
            strip = cv2.rotate(strip, cv2.ROTATE_90_COUNTERCLOCKWISE)
            sy = top + ((bottom - top) - strip.shape[0]) // 2
            sx = max(0, x0 - strip.shape[1] - 2)
            panel[sy:sy + strip.shape[0], sx:sx + strip.shape[1]] = strip
    return panel


def heatmap_overlay(base: np.ndarray, score_map: np.ndarray, *, alpha: float = 0.45, colormap: str = "jet",
                    legend: bool = True, label: str = "salience", normalise: bool = True) -> np.ndarray:
    """``score_map`` (any 2-D shape covering the whole image) over ``base`` (grey or RGB uint8).

    The map is min-max normalised (unless ``normalise=False``, then it must lie in [0, 1]), resized bilinearly to
    the base, coloured (high = hot) and blended with ``cv2.addWeighted(colour, alpha, base, 1 - alpha)``. With
    ``legend`` a colour bar (:func:`colorbar`) is appended on the right: the result is ``(H, W + bar, 3)``.
    """
    if colormap not in COLORMAPS:
        raise ValueError(f"colormap must be one of {sorted(COLORMAPS)}, got {colormap!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    rgb = to_rgb(base)
    h, w = rgb.shape[:2]
    m = np.asarray(score_map, dtype=np.float32)
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"score map must be a non-empty 2-D array, got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        m = np.nan_to_num(m, nan=0.0, posinf=0.0, neginf=0.0)
    if normalise:
        lo, hi = float(m.min()), float(m.max())
        m = (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
    m = np.clip(m, 0.0, 1.0)
    up = cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR) if m.shape != (h, w) else m
    colour = cv2.applyColorMap(np.rint(up * 255).astype(np.uint8), COLORMAPS[colormap])[:, :, ::-1]
    out = cv2.addWeighted(np.ascontiguousarray(colour), float(alpha), rgb, 1.0 - float(alpha), 0.0)
    if legend:
        out = np.concatenate([out, colorbar(h, colormap=colormap, label=label)], axis=1)
    return out


def salience_overlay(analysis, *, max_side: int | None = 1024, colormap: str = "jet", alpha: float = 0.45,
                     legend: bool = True) -> np.ndarray:
    """The report model's attention (``analysis.salience.token_map``) over the radiograph, with a legend."""
    base = original(analysis.xray, max_side)
    return heatmap_overlay(base, analysis.salience.token_map, alpha=alpha, colormap=colormap, legend=legend,
                           label="attention")


def token_overlay(analysis, index: int, *, max_side: int | None = 1024, colormap: str = "jet", alpha: float = 0.45,
                  legend: bool = True) -> np.ndarray:
    """The attention map of report token ``index`` (``analysis.salience.per_token[index]``) over the radiograph."""
    pt = analysis.salience.per_token
    if not 0 <= int(index) < len(pt):
        raise IndexError(f"token index {index} is outside 0..{len(pt) - 1}")
    base = original(analysis.xray, max_side)
    return heatmap_overlay(base, pt[int(index)], alpha=alpha, colormap=colormap, legend=legend, label="attention")


def clean_tokens(tokens: Iterable[str]) -> list[str]:
    """WordPiece / SentencePiece tokens as readable text pieces: ``"##ing"`` -> ``"ing"``, ``"▁lung"`` ->
    ``" lung"``; a word-initial token gets a leading space (except the first)."""
    out = []
    for i, t in enumerate(tokens):
        t = str(t)
        if t.startswith("##"):
            out.append(t[2:])
        elif t.startswith("\u2581") or t.startswith("\u0120"):
            out.append((" " if i else "") + t[1:])
        else:
            out.append((" " if i else "") + t)
    return out


def token_focus(per_token: np.ndarray) -> np.ndarray:
    """How concentrated each token's attention is, in [0, 1]: ``(max - mean) / max`` of its map (0 = spread
    evenly over the image, towards 1 = fixed on one region). Shape ``(T,)``."""
    pt = np.asarray(per_token, dtype=np.float64)
    if pt.ndim != 3 or pt.shape[0] == 0:
        return np.zeros((0,), dtype=np.float64)
    flat = pt.reshape(pt.shape[0], -1)
    mx = flat.max(axis=1)
    return np.where(mx > 0, (mx - flat.mean(axis=1)) / np.maximum(mx, 1e-12), 0.0)


# ---------------------------------------------------------------------------------------------------------- patches

def retained_patches(artifact, *, context: bool = False, max_side: int | None = 1024,
                     window: tuple[float, float] | None = None) -> np.ndarray:
    """What the artifact keeps: the retained full-resolution patches on black (``context=False``) or over the
    upsampled low-resolution context layer (``context=True``; dimmed so the kept patches stand out; black when the
    artifact has no context layer). ``window``: the display window of the original (:func:`display_window`), so
    both views match the original's grey levels; default: from the kept pixels."""
    img = artifact.reconstruct("blank")
    if window is None:
        window = display_window(artifact.patches.reshape(-1, artifact.patch), artifact.bit_depth)
    grey = display_grey(img, artifact.bit_depth, window)
    if context and artifact.context is not None:
        cgrey = display_grey(artifact.context_full(), artifact.bit_depth, window)
        dim = np.rint(cgrey.astype(np.float32) * 0.55).astype(np.uint8)
        mask = _mask_pixels(artifact.mask(), artifact.patch, artifact.height, artifact.width)
        grey = np.where(mask, grey, dim)
    return to_rgb(fit(np.ascontiguousarray(grey), max_side)[0])


def _mask_pixels(mask: np.ndarray, patch: int, height: int, width: int) -> np.ndarray:
    """A ``(rows, cols)`` patch mask as a ``(height, width)`` pixel mask."""
    m = np.repeat(np.repeat(np.asarray(mask, dtype=bool), patch, axis=0), patch, axis=1)
    return m[:height, :width]


def _as_set(patches) -> set[tuple[int, int]]:
    return {(int(p[0]), int(p[1])) for p in (patches or [])}


def patch_grid_overlay(base: np.ndarray, grid, mask: np.ndarray, *, missed=(), irrelevant=(), scale: float = 1.0,
                       show_grid: bool = True) -> np.ndarray:
    """The correction view: ``base`` (the display image, ``scale`` = display / source width) with the patch grid
    drawn faintly, kept patches (``mask``, ``(rows, cols)``) outlined in green, the reader's *missed* patches
    filled orange and *irrelevant* patches filled red with a cross. Returns RGB of the base's size."""
    out = to_rgb(base).copy()
    h, w = out.shape[:2]
    P = grid.patch * float(scale)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != (grid.rows, grid.cols):
        raise ValueError(f"mask has shape {mask.shape}, grid is {grid.rows}x{grid.cols}")

    def box(r: int, c: int) -> tuple[int, int, int, int]:
        return (int(round(c * P)), int(round(r * P)), min(w - 1, int(round((c + 1) * P)) - 1),
                min(h - 1, int(round((r + 1) * P)) - 1))

    if show_grid and P >= 6:
        lines = out.copy()
        for c in range(1, grid.cols):
            x = int(round(c * P))
            cv2.line(lines, (x, 0), (x, h - 1), (120, 120, 120), 1)
        for r in range(1, grid.rows):
            y = int(round(r * P))
            cv2.line(lines, (0, y), (w - 1, y), (120, 120, 120), 1)
        out = cv2.addWeighted(lines, 0.35, out, 0.65, 0.0)
    fill = out.copy()
    for cells, colour in ((_as_set(missed), MISSED_RGB), (_as_set(irrelevant), IRRELEVANT_RGB)):
        for r, c in cells:
            if 0 <= r < grid.rows and 0 <= c < grid.cols:
                x0, y0, x1, y1 = box(r, c)
                cv2.rectangle(fill, (x0, y0), (x1, y1), colour, -1)
    out = cv2.addWeighted(fill, 0.45, out, 0.55, 0.0)
    thick = 1 if P < 24 else 2
    for r, c in np.argwhere(mask):
        x0, y0, x1, y1 = box(int(r), int(c))
        cv2.rectangle(out, (x0, y0), (x1, y1), KEPT_RGB, thick)
    for r, c in _as_set(irrelevant):
        if 0 <= r < grid.rows and 0 <= c < grid.cols:
            x0, y0, x1, y1 = box(r, c)
            cv2.line(out, (x0, y0), (x1, y1), IRRELEVANT_RGB, thick)
            cv2.line(out, (x0, y1), (x1, y0), IRRELEVANT_RGB, thick)
    for r, c in _as_set(missed):
        if 0 <= r < grid.rows and 0 <= c < grid.cols:
            x0, y0, x1, y1 = box(r, c)
            cv2.rectangle(out, (x0, y0), (x1, y1), MISSED_RGB, thick)
    return out


def pixel_to_patch(x: float, y: float, grid, scale: float = 1.0) -> tuple[int, int] | None:
    """The patch ``(r, c)`` under display pixel ``(x, y)`` (``scale`` = display / source width), or ``None``
    outside the image."""
    sx, sy = float(x) / float(scale), float(y) / float(scale)
    if not (0 <= sx < grid.width and 0 <= sy < grid.height):
        return None
    return int(sy // grid.patch), int(sx // grid.patch)


def mask_to_patches(mask: np.ndarray, grid, *, min_fraction: float = 0.25) -> set[tuple[int, int]]:
    """Patches of ``grid`` at least ``min_fraction`` covered by ``mask``. A mask of another size than the source
    image (a brush mask drawn at display size) is first rescaled to the source size (nearest neighbour)."""
    m = np.asarray(mask, dtype=np.uint8)
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"mask must be 2-D, got shape {m.shape}")
    if m.shape != (grid.height, grid.width):
        m = cv2.resize(m, (grid.width, grid.height), interpolation=cv2.INTER_NEAREST)
    P = grid.patch
    padded = np.zeros((grid.rows * P, grid.cols * P), dtype=np.float64)
    padded[: grid.height, : grid.width] = m > 0
    sums = padded.reshape(grid.rows, P, grid.cols, P).sum(axis=(1, 3))
    frac = sums / np.outer(grid.row_heights(), grid.col_widths())
    return {(int(r), int(c)) for r, c in np.argwhere(frac >= float(min_fraction))}


# ---------------------------------------------------------------------------------------------------------- figures

def _png_data_uri(rgb: np.ndarray) -> str:
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[:, :, ::-1]))
    if not ok:  # pragma: no cover
        raise RuntimeError("PNG encoding failed")
    return "data:image/png;base64," + base64.b64encode(buf.tobytes()).decode("ascii")


def empty_figure(message: str = "nothing to show yet", height: int = 400):
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.add_annotation(text=message, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                       font={"size": 15, "color": "#666"})
    fig.update_layout(height=int(height), xaxis={"visible": False}, yaxis={"visible": False},
                      margin={"l": 10, "r": 10, "t": 30, "b": 10}, template="plotly_white")
    return fig


_ENTITY_STYLE = {  # (type, certainty) -> (legend name, colour, symbol)
    ("anatomy", "present"): ("anatomy", "#1f77b4", "square"),
    ("observation", "present"): ("observation: present", "#d62728", "circle"),
    ("observation", "uncertain"): ("observation: uncertain", "#ff7f0e", "diamond"),
    ("observation", "absent"): ("observation: absent", "#7f7f7f", "x"),
}


#: Report-node labels longer than this are cut (the full text is in the hover).
LABEL_CHARS = 24


def _label(text: str, limit: int = LABEL_CHARS) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _report_slots(n: int, edges: list[tuple[int, int]], max_rows: int, max_cols: int
                  ) -> tuple[dict[int, tuple[int, int]], int, int]:
    """Grid slots ``{node: (column, row)}`` for ``n`` report nodes, and the grid's ``(columns, rows)``.

    Deterministic and overlap-free by construction (one node per slot). The relation graph's connected components
    come in report order (by their first entity), each one a run of consecutive rows of one column (depth-first
    from its first entity, so a chain of relations joins neighbouring rows) with a blank row between components
    where there is room; the smallest number of rows that fits in ``max_cols`` columns without splitting a
    component is used, so the nodes spread over the box. Only a component taller than ``max_rows`` is split."""
    import networkx as nx

    g = nx.Graph()
    g.add_nodes_from(range(n))
    g.add_edges_from(edges)
    comps = []
    for c in sorted((sorted(c) for c in nx.connected_components(g)), key=lambda c: c[0]):
        order = list(nx.dfs_preorder_nodes(g.subgraph(c), source=c[0], sort_neighbors=sorted))
        comps.append(order)

    def pack(rows: int, gaps: bool):
        slots, col, row, split = {}, 0, 0, False
        for comp in comps:
            start = row + (1 if (gaps and row) else 0)
            if start + len(comp) > rows:
                if len(comp) <= rows:
                    col, start = col + (1 if row else 0), 0
                else:
                    split = True
            for j in comp:
                if start >= rows:
                    col, start = col + 1, 0
                slots[j] = (col, start)
                start += 1
            row = start
        return slots, max(c for c, _ in slots.values()) + 1, split

    biggest = max(len(c) for c in comps)
    for gaps in (True, False):
        lo = max(1, math.ceil((n + (len(comps) - 1 if gaps else 0)) / max_cols), min(biggest, max_rows))
        for rows in range(lo, max_rows + 1):
            slots, cols, split = pack(rows, gaps)
            if cols <= max_cols and (not split or biggest > max_rows):
                return slots, cols, rows
    # more nodes than max_cols columns hold at the minimum spacing: more columns (the figure gets wider)
    slots, cols, _ = pack(max_rows, False)
    return slots, cols, max_rows


def graph_figure(analysis, *, height: int = 600, thumbnail_side: int = 384, colormap: str = "Jet"):
    """The fused graph as a plotly figure (explicit ``height``).

    Image nodes sit at their patch centres over a thumbnail of the radiograph (a layout image), coloured by
    salience; 8-neighbour spatial edges are thin grey lines. Report-graph nodes are laid out on a grid of slots in
    a box to the right of the thumbnail (:func:`_report_slots`: one node per slot, at least ~26 px apart at this
    ``height``, related entities in neighbouring rows of one column), labelled on their right with at most
    :data:`LABEL_CHARS` characters, coloured by type and certainty (anatomy blue squares; observations red present,
    orange uncertain, grey absent), with their relations; the bridge edge(s) between the two graphs are drawn thick
    in magenta. Hovering shows the patch coordinates and salience or the full entity text, type and certainty.
    """
    import plotly.graph_objects as go

    data = analysis.fused
    H, W = analysis.xray.meta.height, analysis.xray.meta.width
    P = analysis.grid.patch
    node_type = data.node_type.cpu().numpy()
    k = int((node_type == 0).sum())
    m = int(node_type.size - k)
    coords = data.coords.cpu().numpy() if getattr(data, "coords", None) is not None else np.argwhere(analysis.mask)
    sal = data.score.cpu().numpy().reshape(-1) if getattr(data, "score", None) is not None else np.zeros(k)
    pos = np.zeros((k + m, 2), dtype=np.float64)
    pos[:k, 0] = np.minimum((coords[:, 1] + 0.5) * P, W)
    pos[:k, 1] = np.minimum((coords[:, 0] + 0.5) * P, H)
    ei = data.edge_index.cpu().numpy()
    et = data.edge_type.cpu().numpy()
    ents = list(analysis.report_graph.entities) if (analysis.report_graph is not None and m) else []
    rep_edges = [(int(s) - k, int(d) - k) for s, d, t in zip(ei[0], ei[1], et) if 1 <= t <= 3 and s < d]
    x_off, box_w = 1.08 * W, 0.85 * W
    if m:
        # screen pixels per data unit: the axes are 1:1 and the plot is height-bound in the full-width layout
        ppu = max(200.0, height - 110.0) / (1.04 * H)
        row_px, col_px, marker_px = 26.0, 190.0, 16.0          # row pitch; marker + gap + 24-character label
        box_top, box_h = 0.04 * H, 0.92 * H
        max_rows = max(1, int(box_h * ppu // row_px))
        max_cols = max(1, int((950.0 - x_off * ppu) // col_px))
        slots, ncols, nrows = _report_slots(m, rep_edges, max_rows, max_cols)
        col_w = col_px / ppu
        pitch = min(box_h / nrows, max(0.14 * H, row_px / ppu))      # few nodes: not spread over the whole box
        y0 = box_top + (box_h - pitch * nrows) / 2 + pitch / 2
        box_w = max(ncols * col_w, 0.3 * W)
        # a relation between non-neighbouring rows of a column would run through the markers between them
        shifted: set[int] = set()
        for s_, d_ in rep_edges:
            (cs, rs), (cd, rd) = slots[s_], slots[d_]
            if cs == cd and abs(rs - rd) > 1:
                shifted |= {j for j, (c, r) in slots.items() if c == cs and min(rs, rd) < r < max(rs, rd)}
        x0 = x_off + 0.5 * marker_px / ppu
        for j, (c, r) in slots.items():
            pos[k + j] = (x0 + c * col_w + (marker_px / ppu if j in shifted else 0.0), y0 + r * pitch)

    fig = go.Figure()
    thumb, _ = fit(original(analysis.xray), thumbnail_side)
    fig.add_layout_image(source=_png_data_uri(thumb), xref="x", yref="y", x=0, y=0, sizex=W, sizey=H,
                         xanchor="left", yanchor="top", sizing="stretch", layer="below", opacity=0.9)

    def segments(pairs):
        xs, ys = [], []
        for a, b in pairs:
            xs += [pos[a, 0], pos[b, 0], None]
            ys += [pos[a, 1], pos[b, 1], None]
        return xs, ys

    spatial = [(int(s), int(d)) for s, d, t in zip(ei[0], ei[1], et) if t == 0 and s < d]
    if spatial:
        xs, ys = segments(spatial)
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line={"color": "rgba(230,230,230,0.55)", "width": 1},
                                 hoverinfo="skip", name="spatial edges"))
    if rep_edges:
        rel_names = {1: "located_at", 2: "suggestive_of", 3: "modify"}
        pairs = [(s + k, d + k) for s, d in rep_edges]
        xs, ys = segments(pairs)
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line={"color": "#9e9e9e", "width": 1.5},
                                 hoverinfo="skip", name="report relations"))
        mids = [(s, d, int(t)) for s, d, t in zip(ei[0], ei[1], et) if 1 <= t <= 3 and s < d]
        fig.add_trace(go.Scatter(
            x=[(pos[s, 0] + pos[d, 0]) / 2 for s, d, _ in mids], y=[(pos[s, 1] + pos[d, 1]) / 2 for s, d, _ in mids],
            mode="markers", marker={"size": 5, "color": "#9e9e9e"}, showlegend=False,
            hovertext=[rel_names.get(t, str(t)) for _, _, t in mids], hoverinfo="text"))
    bridges = [tuple(int(v) for v in p) for p in data.bridge_index.t().tolist()] \
        if getattr(data, "bridge_index", None) is not None else []
    if bridges:
        xs, ys = segments(bridges)
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line={"color": "#ff00ff", "width": 4},
                                 hoverinfo="skip", name="bridge (max betweenness)"))
    if k:
        fig.add_trace(go.Scatter(
            x=pos[:k, 0], y=pos[:k, 1], mode="markers", name=f"image patches ({k})",
            marker={"size": float(np.clip(380.0 / np.sqrt(max(k, 1)), 5, 14)), "color": sal, "cmin": 0,
                    "cmax": 1, "colorscale": colormap, "line": {"color": "white", "width": 0.6},
                    "colorbar": {"title": {"text": "salience"}, "x": -0.04, "xanchor": "right", "len": 0.8,
                                 "thickness": 12}},
            hovertext=[f"patch ({int(r)}, {int(c)})<br>salience {s:.3f}" for (r, c), s in zip(coords, sal)],
            hoverinfo="text"))
    if m:
        by_style: dict[tuple, list[int]] = {}
        for j in range(m):
            e = ents[j] if j < len(ents) else None
            key = (getattr(e, "type", "observation"), getattr(e, "certainty", "present"))
            by_style.setdefault(key if key in _ENTITY_STYLE else ("observation", "present"), []).append(j)
        for key, idx in by_style.items():
            name, colour, symbol = _ENTITY_STYLE[key]
            texts = [getattr(ents[j], "text", f"entity {j}") if j < len(ents) else f"entity {j}" for j in idx]
            hover = [f"<b>{t}</b><br>{key[0]}, {key[1]}" for t in texts]
            fig.add_trace(go.Scatter(
                x=pos[[k + j for j in idx], 0], y=pos[[k + j for j in idx], 1], mode="markers+text", name=name,
                text=[_label(t) for t in texts], textposition="middle right", cliponaxis=False,
                textfont={"size": 11}, hovertext=hover, hoverinfo="text",
                marker={"size": 16, "color": colour, "symbol": symbol, "line": {"color": "#333", "width": 1}}))
    else:
        fig.add_annotation(x=x_off + box_w / 2, y=H / 2, text="image-only graph<br>(no report entities)",
                           showarrow=False, font={"size": 13, "color": "#666"})
    fig.update_xaxes(visible=False, range=[-0.02 * W, x_off + box_w + 0.02 * W])
    fig.update_yaxes(visible=False, range=[H * 1.02, -0.02 * H], scaleanchor="x", scaleratio=1)
    fig.update_layout(height=int(height), template="plotly_white", margin={"l": 40, "r": 10, "t": 40, "b": 10},
                      title={"text": f"Fused graph: {k} image nodes, {m} report nodes, "
                                     f"{len(bridges)} bridge{'s' if len(bridges) != 1 else ''}", "x": 0.02},
                      legend={"orientation": "h", "y": -0.02, "yanchor": "top"}, hovermode="closest")
    return fig


def attribution_figure(explanation, *, height: int = 360, top: int = 8):
    """Horizontal bars of the largest per-node attributions (patches and report entities) of an
    :class:`~neural_core.explain.Explanation`, positive = towards pneumonia."""
    import plotly.graph_objects as go

    if explanation is None:
        return empty_figure("no classifier in this model bundle", height)
    items = [(f"patch ({p['patch'][0]}, {p['patch'][1]})" if p["patch"] else f"node {p['node']}",
              p["attribution"], "image") for p in explanation.top_patches[:top]]
    items += [(f"“{e['text']}” ({e['certainty']})" if e.get("certainty") else e["text"], e["attribution"], "report")
              for e in explanation.top_entities[:top]]
    items.sort(key=lambda t: abs(t[1]))
    fig = go.Figure(go.Bar(
        x=[v for _, v, _ in items], y=[f"{n} " for n, _, _ in items], orientation="h",
        marker={"color": ["#1f77b4" if kind == "image" else "#ff7f0e" for _, _, kind in items]},
        hovertext=[f"{kind} node: {v:+.4f}" for _, v, kind in items], hoverinfo="text"))
    fig.update_layout(height=int(height), template="plotly_white", margin={"l": 10, "r": 10, "t": 50, "b": 30},
                      title={"text": f"Integrated Gradients on node embeddings — image {explanation.image_share:.0%}"
                                     f" / report {explanation.report_share:.0%}", "x": 0.02, "font": {"size": 14}},
                      xaxis={"title": {"text": "contribution to the logit (blue image, orange report)"},
                             "zeroline": True})
    return fig


def bar_figure(labels, values, *, title: str = "", height: int = 320, colors=None, yaxis_title: str = ""):
    """A simple bar chart (reader analytics)."""
    import plotly.graph_objects as go

    fig = go.Figure(go.Bar(x=list(labels), y=list(values), marker={"color": colors} if colors else None,
                           text=[f"{v:g}" if isinstance(v, (int, float)) else v for v in values],
                           textposition="auto"))
    fig.update_layout(height=int(height), template="plotly_white", title={"text": title, "x": 0.02},
                      margin={"l": 40, "r": 10, "t": 50, "b": 40}, yaxis={"title": {"text": yaxis_title}})
    return fig


def histogram_figure(values, *, title: str = "", height: int = 320, xaxis_title: str = "", nbins: int = 10,
                     range_x=(0.0, 1.0)):
    """A histogram (reader analytics); an empty list gives a placeholder figure."""
    import plotly.graph_objects as go

    vals = [float(v) for v in values if v is not None and np.isfinite(v)]
    if not vals:
        return empty_figure(f"{title}: no data yet", height)
    fig = go.Figure(go.Histogram(x=vals, nbinsx=nbins, marker={"color": "#1f77b4"}))
    fig.update_layout(height=int(height), template="plotly_white", title={"text": title, "x": 0.02},
                      margin={"l": 40, "r": 10, "t": 50, "b": 40}, xaxis={"title": {"text": xaxis_title},
                                                                        "range": list(range_x)},
                      yaxis={"title": {"text": "count"}})
    return fig
