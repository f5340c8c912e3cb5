"""Figures of the review page that need the app's choices on top of :mod:`neural_core.viz`: the fused graph with
its report side kept readable for long reports (duplicate mentions merged, the most connected terms shown first)."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch

from neural_core import viz

#: Report terms drawn by default; the page has a switch to draw them all.
MAX_REPORT_NODES = 40


@dataclass
class GraphView:
    """A figure and a sentence saying what it shows (how many report terms, merged or left out)."""

    figure: object
    note: str
    shown: int
    total: int


def _key(e) -> tuple:
    return (re.sub(r"\s+", " ", str(getattr(e, "text", "")).strip().lower()), getattr(e, "type", None),
            getattr(e, "certainty", None))


def reduce_report_nodes(data, entities, *, max_nodes: int | None) -> tuple[object, list, int]:
    """A view of the fused graph ``data`` whose report side has duplicate mentions merged (same text, type and
    certainty: one node, its label counting the mentions) and, when ``max_nodes`` is given, only the
    ``max_nodes`` most connected terms (degree in the merged report graph plus mentions; the bridged term is
    always kept). Image nodes are untouched.

    *Shapes:* ``data`` as built by :func:`neural_core.graphs.fuse.fuse` (``k`` image nodes first, then ``m``
    report nodes in entity order); returns ``(view, entities, m_merged)`` where ``view`` has the same attributes
    (``node_type``, ``coords``, ``score``, ``edge_index``, ``edge_type``, ``bridge_index``) over ``k + m'``
    nodes."""
    node_type = data.node_type.cpu().numpy()
    k = int((node_type == 0).sum())
    m = int(node_type.size - k)
    ents = list(entities or [])
    groups: dict[tuple, int] = {}
    group_of = np.zeros(m, dtype=np.int64)
    reps: list = []
    counts: list[int] = []
    for j in range(m):
        e = ents[j] if j < len(ents) else SimpleNamespace(text=f"term {j}", type="observation", certainty="present")
        g = groups.setdefault(_key(e), len(groups))
        if g == len(reps):
            reps.append(e)
            counts.append(0)
        counts[g] += 1
        group_of[j] = g
    m_merged = len(reps)
    ei = data.edge_index.cpu().numpy()
    et = data.edge_type.cpu().numpy()
    bridges = data.bridge_index.cpu().numpy() if getattr(data, "bridge_index", None) is not None else \
        np.zeros((2, 0), np.int64)

    def remap(v: np.ndarray) -> np.ndarray:
        v = v.copy()
        rep = v >= k
        v[rep] = k + group_of[v[rep] - k]
        return v

    src, dst = remap(ei[0]), remap(ei[1])
    keep_edge = src != dst
    src, dst, et = src[keep_edge], dst[keep_edge], et[keep_edge]
    bsrc, bdst = remap(bridges[0]), remap(bridges[1])
    # degree in the merged report graph (distinct neighbours) + mentions: the most connected terms first
    rel = (src >= k) & (dst >= k)
    pairs = {(int(a), int(b)) for a, b in zip(src[rel], dst[rel])}
    degree = np.zeros(m_merged)
    for a, b in pairs:
        degree[a - k] += 1
    score = degree + np.asarray(counts, dtype=np.float64)
    keep_groups = np.arange(m_merged)
    if max_nodes is not None and m_merged > max_nodes:
        must = {int(v) - k for v in np.concatenate([bsrc, bdst]) if v >= k}
        order = [int(g) for g in np.argsort(-score, kind="stable") if int(g) not in must]
        keep_groups = np.array(sorted(must | set(order[: max(0, max_nodes - len(must))])), dtype=np.int64)
    new_of = -np.ones(m_merged, dtype=np.int64)
    new_of[keep_groups] = np.arange(len(keep_groups))

    def final(v: np.ndarray) -> np.ndarray:
        v = v.copy()
        rep = v >= k
        v[rep] = np.where(new_of[v[rep] - k] >= 0, k + new_of[v[rep] - k], -1)
        return v

    src, dst = final(src), final(dst)
    ok = (src >= 0) & (dst >= 0)
    # duplicate edges after merging are drawn once
    seen, idx = set(), []
    for i in np.flatnonzero(ok):
        key = (int(src[i]), int(dst[i]), int(et[i]))
        if key not in seen:
            seen.add(key)
            idx.append(i)
    idx = np.asarray(idx, dtype=np.int64)
    bsrc, bdst = final(bsrc), final(bdst)
    bok = (bsrc >= 0) & (bdst >= 0)
    shown = [SimpleNamespace(text=str(getattr(reps[g], "text", "")) + (f" ×{counts[g]}" if counts[g] > 1 else ""),
                             type=getattr(reps[g], "type", "observation"),
                             certainty=getattr(reps[g], "certainty", "present")) for g in keep_groups]
    view = SimpleNamespace(
        node_type=torch.cat([data.node_type[:k].cpu(), torch.ones(len(keep_groups), dtype=torch.long)]),
        coords=getattr(data, "coords", None), score=getattr(data, "score", None),
        edge_index=torch.from_numpy(np.stack([src[idx], dst[idx]]) if len(idx) else np.zeros((2, 0), np.int64)),
        edge_type=torch.from_numpy(et[idx] if len(idx) else np.zeros(0, np.int64)),
        bridge_index=torch.from_numpy(np.stack([bsrc[bok], bdst[bok]])))
    return view, shown, m_merged


def graph_view(a, *, show_all: bool = False, max_nodes: int = MAX_REPORT_NODES, height: int = 560) -> GraphView:
    """The fused graph of analysis ``a`` with a readable report side (see :func:`reduce_report_nodes`)."""
    data = a.fused
    k = int(data.num_image_nodes)
    m = int(data.num_nodes) - k
    ents = list(a.report_graph.entities) if a.report_graph is not None else []
    if m == 0:
        return GraphView(viz.graph_figure(a, height=height), "The graph holds image regions only.", 0, 0)
    view, shown, merged = reduce_report_nodes(data, ents, max_nodes=None if show_all else max_nodes)
    proxy = SimpleNamespace(fused=view, xray=a.xray, grid=a.grid, mask=a.mask,
                            report_graph=SimpleNamespace(entities=shown))
    fig = viz.graph_figure(proxy, height=height)
    note = f"{m} report mentions"
    if merged < m:
        note += f", {merged} distinct terms (repeats merged: ×N counts them)"
    if len(shown) < merged:
        note += f"; showing the {len(shown)} most connected — tick *Show all report terms* to draw every one"
    return GraphView(fig, note + ".", len(shown), merged)


def analytics_view(counts, dist: dict, pk, fk: dict, sal, *, hide_reader: str | None = None) -> dict:
    """The Analytics tab from :mod:`db.analytics` results: the readers table (``hide_reader`` left out unless it
    submitted), the verdict bars, the pairwise kappa table, a summary and the IoU histogram."""
    counts = counts[(counts.username != hide_reader) | (counts.n_submissions > 0)].drop(columns=["reader_id"])
    iou = [v for v in sal.iou.tolist() if v is not None and not (isinstance(v, float) and math.isnan(v))] \
        if len(sal) else []
    hits = [h for h in sal.pointing_hit.tolist() if h is not None] if len(sal) else []
    fk_txt = (f"{fk['kappa']:.3f}" if not math.isnan(fk["kappa"]) else "undefined")
    md = (f"**Fleiss' κ** (analyses read by ≥ {fk['min_readers']} readers): {fk_txt} over "
          f"{fk['n_analyses']} analyses, {fk['n_readers']} readers.  \n"
          f"**Salience vs corrections**: {len(sal)} current annotations; mean IoU between the kept patches and "
          f"the reader-corrected set "
          f"{(sum(iou) / len(iou)) if iou else float('nan'):.3f}; pointing game "
          f"{(sum(hits) / len(hits)) if hits else float('nan'):.1%} "
          f"({sum(hits)} / {len(hits)} top patches inside the corrected set).")
    return {
        "an_counts": counts.round(2),
        "an_verdicts": viz.bar_figure(list(dist), list(dist.values()), title="Current verdicts", height=320,
                                      colors=["#2e7d32", "#f9a825", "#c62828"], yaxis_title="annotations"),
        "an_kappa": pk.round(3),
        "an_md": md,
        "an_iou": viz.histogram_figure(iou, title="IoU: kept patches vs reader-corrected set", height=320,
                                       xaxis_title="IoU"),
    }
