"""Views: pure functions to RGB uint8 arrays of the right shape, and plotly figures with explicit heights."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from neural_core import stages, viz
from neural_core.config import ClassifierConfig, PruneConfig
from neural_core.graphs.fuse import report_graph_tensors
from neural_core.graphs.report_kg import extract
from neural_core.io import from_array
from neural_core.phantoms import phantom
from neural_core.prune import grid_for

CCFG = ClassifierConfig(patch_pixels=8, text_dim=16)


class ZeroEncoder:
    def encode(self, texts):
        return np.zeros((len(texts), 16), dtype=np.float32)


def _analysis(with_report: bool = True, h: int = 200, w: int = 176, context: int = 16, report: str | None = None):
    """A StudyAnalysis-like object built from the real pieces (no report model needed); ``report`` replaces the
    phantom's own."""
    p = phantom(1, height=h, width=w)
    grid = grid_for(h, w)
    token_map = np.zeros((7, 7), dtype=np.float32)
    token_map[4:6, 1:3] = 1.0
    scores = stages.score_patches(token_map, grid)
    mask = stages.select_patches(scores, PruneConfig(keep=0.1))
    art = stages.make_artifact(p.xray.raw, 8, grid, scores, mask, model=stages.TRAIN_MODEL_ID, meta={},
                               context_side=context)
    visual = stages.visual_graph(art, CCFG)
    rg = extract(report or p.report) if with_report else None
    rep = report_graph_tensors(rg, ZeroEncoder(), text_dim=16) if rg is not None else None
    per_token = np.stack([token_map / token_map.sum(), np.full((7, 7), 1 / 49, dtype=np.float32)])
    sal = SimpleNamespace(token_map=token_map, per_token=per_token, tokens=["consolidation", "##s"])
    return SimpleNamespace(xray=p.xray, grid=grid, mask=mask, patch_scores=scores, artifact=art, salience=sal,
                           report_graph=rg, fused=stages.fuse_graphs(visual, rep), image_only=not with_report)


@pytest.fixture(scope="module")
def analysis():
    return _analysis()


# ------------------------------------------------------------------------------------------------ basics

def test_display_grey_8_bit_is_identity():
    raw = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert np.array_equal(viz.display_grey(raw, 8), raw)


def test_display_grey_16_bit_linear_and_narrow_range_windowed():
    full = np.linspace(0, 65535, 64 * 64).astype(np.uint16).reshape(64, 64)
    g = viz.display_grey(full, 16)
    assert g.dtype == np.uint8 and g.min() == 0 and g.max() == 255
    narrow = (np.linspace(0, 4095, 64 * 64).astype(np.uint16).reshape(64, 64))      # 12 bits in a 16-bit array
    g2 = viz.display_grey(narrow, 16)
    assert g2.max() >= 250 and g2.mean() > 100                                     # windowed, not black
    lo, hi = viz.display_window(narrow, 16)
    assert 0 <= lo < hi <= 4095


def test_to_rgb_and_fit():
    grey = np.zeros((30, 40), dtype=np.uint8)
    assert viz.to_rgb(grey).shape == (30, 40, 3)
    assert viz.to_rgb(np.zeros((30, 40, 4), np.uint8)).shape == (30, 40, 3)
    small, s = viz.fit(np.zeros((2000, 1000, 3), np.uint8), 1024)
    assert small.shape == (1024, 512, 3) and s == pytest.approx(0.512)
    same, s1 = viz.fit(grey, 1024)
    assert same is grey and s1 == 1.0
    with pytest.raises(ValueError):
        viz.to_rgb(np.zeros((3, 3), np.float32))


def test_original_shape():
    x = from_array(np.random.default_rng(0).integers(0, 4096, (300, 200)).astype(np.uint16), bit_depth=12)
    assert viz.original(x).shape == (300, 200, 3)
    assert viz.original(x, max_side=150).shape == (150, 100, 3)


# ------------------------------------------------------------------------------------------------ heatmaps

def test_colorbar_high_is_hot_at_the_top():
    bar = viz.colorbar(300, 50, colormap="jet")
    assert bar.shape == (300, 50, 3) and bar.dtype == np.uint8
    col = bar[:, 25].astype(int)
    top, bottom = col[60], col[-60]
    assert top[0] > top[2] and bottom[2] > bottom[0]                                # red high, blue low
    inferno = viz.colorbar(300, 50, colormap="inferno")[:, 25].astype(int)
    assert inferno[60].sum() > inferno[-60].sum()                                   # bright high, dark low


@pytest.mark.parametrize("colormap", ["jet", "inferno"])
def test_heatmap_overlay_shape_and_hot_where_high(colormap):
    base = np.full((120, 160), 128, np.uint8)
    m = np.zeros((4, 4), np.float32)
    m[:, 2:] = 1.0                                                                  # right half salient
    out = viz.heatmap_overlay(base, m, colormap=colormap)
    assert out.dtype == np.uint8 and out.shape[0] == 120 and out.shape[1] > 160 and out.shape[2] == 3
    plain = viz.heatmap_overlay(base, m, colormap=colormap, legend=False)
    assert plain.shape == (120, 160, 3)
    assert np.array_equal(out[:, :160], plain)
    left, right = plain[:, :40].astype(int), plain[:, -40:].astype(int)
    if colormap == "jet":
        assert right[..., 0].mean() > left[..., 0].mean() + 40                     # red where salient
    else:
        assert right.sum(axis=2).mean() > left.sum(axis=2).mean() + 60             # brighter where salient


def test_heatmap_overlay_constant_map_and_bad_input():
    base = np.zeros((50, 50, 3), np.uint8)
    assert viz.heatmap_overlay(base, np.ones((3, 3)), legend=False).shape == (50, 50, 3)
    with pytest.raises(ValueError):
        viz.heatmap_overlay(base, np.ones(3))
    with pytest.raises(ValueError):
        viz.heatmap_overlay(base, np.ones((3, 3)), colormap="rainbow")


def test_salience_and_token_overlays(analysis):
    h, w = analysis.xray.meta.height, analysis.xray.meta.width
    s = viz.salience_overlay(analysis)
    legend = viz.colorbar(h, label="attention")               # the overlay is the image with its legend beside it
    assert s.shape == (h, w + legend.shape[1], 3)
    np.testing.assert_array_equal(s[:, w:], legend)
    t = viz.token_overlay(analysis, 0, legend=False)
    assert t.shape == (h, w, 3)
    with pytest.raises(IndexError):
        viz.token_overlay(analysis, 5)


def test_clean_tokens_and_focus():
    assert viz.clean_tokens(["right", "lo", "##be", "\u2581lung", ","]) == ["right", " lo", "be", " lung", " ,"]
    pt = np.stack([np.eye(3) / 3, np.full((3, 3), 1 / 9)])
    f = viz.token_focus(pt)
    assert f.shape == (2,) and f[0] > f[1] and f[1] == pytest.approx(0.0)


# ------------------------------------------------------------------------------------------------ patches

def test_retained_patches_blank_and_with_context(analysis):
    a = analysis
    h, w = a.xray.meta.height, a.xray.meta.width
    blank = viz.retained_patches(a.artifact)
    ctx = viz.retained_patches(a.artifact, context=True)
    assert blank.shape == ctx.shape == (h, w, 3) and blank.dtype == np.uint8
    P = a.grid.patch
    (r, c), (rn, cn) = np.argwhere(a.mask)[0], np.argwhere(~a.mask)[0]
    kept_px = blank[r * P:(r + 1) * P, c * P:(c + 1) * P, 0]
    assert np.array_equal(kept_px, a.xray.raw[r * P:(r + 1) * P, c * P:(c + 1) * P])   # exact pixels
    assert blank[rn * P:(rn + 1) * P, cn * P:(cn + 1) * P].max() == 0                  # pruned = black
    pruned = ~np.repeat(np.repeat(a.mask, P, 0), P, 1)[:h, :w]
    assert ctx[pruned].mean() > blank[pruned].mean() + 5                                # context fills in
    assert viz.retained_patches(a.artifact, max_side=100).shape[:2] == (100, round(w * 100 / h))


def test_patch_grid_overlay_colours(analysis):
    a = analysis
    base = viz.original(a.xray)
    kept = tuple(np.argwhere(a.mask)[0])
    miss = tuple(np.argwhere(~a.mask)[-1])
    out = viz.patch_grid_overlay(base, a.grid, a.mask, missed=[miss], irrelevant=[kept])
    assert out.shape == base.shape and out.dtype == np.uint8
    P = a.grid.patch
    cell = out[miss[0] * P + 2:(miss[0] + 1) * P - 2, miss[1] * P + 2:(miss[1] + 1) * P - 2].astype(int)
    assert (cell[..., 0] - cell[..., 2]).mean() > 60                                   # orange-ish fill
    # scaled display: same overlay at half size
    half = viz.fit(base, max(base.shape[:2]) // 2)[0]
    out2 = viz.patch_grid_overlay(half, a.grid, a.mask, scale=half.shape[1] / base.shape[1])
    assert out2.shape == half.shape
    with pytest.raises(ValueError):
        viz.patch_grid_overlay(base, a.grid, a.mask[:-1])


def test_pixel_to_patch_with_scale(analysis):
    g = analysis.grid
    assert viz.pixel_to_patch(0, 0, g) == (0, 0)
    assert viz.pixel_to_patch(g.patch * 2 + 1, g.patch * 3 + 1, g) == (3, 2)
    assert viz.pixel_to_patch((g.patch * 2 + 1) / 2, (g.patch * 3 + 1) / 2, g, scale=0.5) == (3, 2)
    assert viz.pixel_to_patch(g.width + 5, 0, g) is None


def test_mask_to_patches_at_25_percent():
    g = grid_for(160, 160, 16)
    # a mask drawn at display size (here half the source) is rescaled before counting (the brush adapter that
    # makes such masks from the editor lives in review/editor.py and is tested in tests/test_review.py)
    mask = np.zeros((80, 80), bool)
    mask[8:16, 16:24] = True                     # patch (1, 2) fully painted
    mask[24:26, 24:32] = True                    # patch (3, 3): 2 of 8 display rows = 25 % -> counts
    mask[40:41, 40:48] = True                    # patch (5, 5): 1 of 8 rows = 12.5 % -> does not
    assert viz.mask_to_patches(mask, g) == {(1, 2), (3, 3)}
    assert viz.mask_to_patches(mask, g, min_fraction=0.5) == {(1, 2)}
    assert viz.mask_to_patches(np.zeros((80, 80), bool), g) == set()


# ------------------------------------------------------------------------------------------------ figures

def test_graph_figure(analysis):
    import plotly.graph_objects as go

    fig = viz.graph_figure(analysis, height=600)
    assert isinstance(fig, go.Figure) and fig.layout.height == 600
    assert len(fig.layout.images) == 1 and fig.layout.images[0].source.startswith("data:image/png;base64,")
    names = [t.name for t in fig.data]
    k = int(analysis.mask.sum())
    img_trace = next(t for t in fig.data if (t.name or "").startswith("image patches"))
    assert len(img_trace.x) == k
    assert all("salience" in h for h in img_trace.hovertext)
    assert any((n or "").startswith("bridge") for n in names)
    assert any(n in ("anatomy", "observation: present", "observation: uncertain", "observation: absent")
               for n in names)
    rep_text = [h for t in fig.data if t.name in ("anatomy", "observation: present") for h in t.hovertext]
    assert any("consolidation" in h.lower() for h in rep_text)
    # image nodes over the thumbnail, report nodes beside it
    W = analysis.xray.meta.width
    assert max(img_trace.x) <= W
    rep_x = [x for t in fig.data if t.name in ("anatomy", "observation: present") for x in t.x]
    assert min(rep_x) > W


LONG_REPORT = ("FINDINGS: Focal airspace consolidation in the right lower lobe with a small right pleural effusion. "
               "Patchy opacity in the left upper lobe. Mild cardiomegaly. Bibasilar atelectasis. Diffuse "
               "interstitial thickening of the bronchovascular markings bilaterally. No pneumothorax. Degenerative "
               "changes of the thoracic spine. IMPRESSION: Right lower lobe consolidation, suggestive of pneumonia. "
               "Possible left upper lobe infection. No acute cardiopulmonary abnormality otherwise.")
ENTITY_TRACES = ("anatomy", "observation: present", "observation: uncertain", "observation: absent")


def _report_nodes(fig):
    return [(x, y, label, hover, t.textposition) for t in fig.data if t.name in ENTITY_TRACES
            for x, y, label, hover in zip(t.x, t.y, t.text, t.hovertext)]


@pytest.mark.parametrize("report", [None, LONG_REPORT], ids=["phantom-report", "25-entities"])
def test_graph_figure_report_nodes_do_not_overlap(report):
    """Report entities on a grid right of the thumbnail: no two markers on top of each other (a modifier and its
    observation, "focal" + "consolidation", used to be), short labels to the right of the markers (never over
    the thumbnail), the full text on hover, and the same picture every time."""
    a = _analysis(report=report)
    H, W = a.xray.meta.height, a.xray.meta.width
    nodes = _report_nodes(viz.graph_figure(a, height=600))
    assert len(nodes) == len(a.report_graph.entities) >= 9
    xy = np.array([(x, y) for x, y, *_ in nodes])
    for i in range(len(xy)):
        for j in range(i + 1, len(xy)):
            dx, dy = np.abs(xy[i] - xy[j])
            # one row apart (>= ~24 px at height 600) or one label-wide column apart
            assert dy >= 0.05 * H or dx >= 0.3 * W, (nodes[i][2], nodes[j][2], dx, dy)
    assert xy[:, 0].min() > W and xy[:, 1].min() > 0 and xy[:, 1].max() < H
    assert all(pos == "middle right" for *_, pos in nodes)
    assert all(len(label) <= viz.LABEL_CHARS for _, _, label, _, _ in nodes)
    for _, _, label, hover, _ in nodes:
        full = hover.split("</b>")[0].removeprefix("<b>")
        assert label == full or (label.endswith("…") and full.startswith(label[:-1]))
    if report:
        assert any("acute cardiopulmonary abnormality" in h for *_, h, _ in nodes)
        assert any(label.endswith("…") for _, _, label, _, _ in nodes)
    again = _report_nodes(viz.graph_figure(a, height=600))
    assert again == nodes


def test_report_slots_keep_relations_together():
    slots, cols, rows = viz._report_slots(10, [(1, 2), (0, 1), (6, 5), (8, 7), (9, 7), (8, 9)], 18, 2)
    assert len(set(slots.values())) == 10 and cols <= 2 and rows <= 18
    for comp in ([0, 1, 2], [5, 6], [7, 8, 9]):                # each relation cluster: one column, adjacent rows
        cs = {slots[j][0] for j in comp}
        rs = sorted(slots[j][1] for j in comp)
        assert len(cs) == 1 and rs == list(range(rs[0], rs[0] + len(comp)))
    slots, cols, rows = viz._report_slots(60, [], 18, 2)        # more than fits: more columns, never stacked
    assert len(set(slots.values())) == 60 and rows == 18 and cols == 4


def test_graph_figure_image_only():
    a = _analysis(with_report=False)
    fig = viz.graph_figure(a, height=500)
    assert fig.layout.height == 500
    assert not any((t.name or "").startswith("bridge") for t in fig.data)
    assert any("image-only" in (ann.text or "") for ann in fig.layout.annotations)


def test_small_figures_have_heights():
    e = SimpleNamespace(top_patches=[{"patch": [1, 2], "attribution": 0.3, "node": 0}],
                        top_entities=[{"text": "consolidation", "certainty": "present", "attribution": -0.2}],
                        image_share=0.6, report_share=0.4)
    f = viz.attribution_figure(e, height=360)
    assert f.layout.height == 360
    bars = dict(zip((y.strip() for y in f.data[0].y), f.data[0].x))   # smallest |attribution| first
    assert bars == {"patch (1, 2)": 0.3, "“consolidation” (present)": -0.2}
    assert "image 60%" in f.layout.title.text and "report 40%" in f.layout.title.text
    none = viz.attribution_figure(None, height=300)
    assert none.layout.height == 300 and "no classifier" in none.layout.annotations[0].text
    b = viz.bar_figure(["a", "b"], [1, 2], height=320)
    assert b.layout.height == 320 and list(b.data[0].x) == ["a", "b"] and list(b.data[0].y) == [1, 2]
    hist = viz.histogram_figure([0.1, 0.5, None, float("nan")], height=310)
    assert hist.layout.height == 310 and list(hist.data[0].x) == [0.1, 0.5]      # missing values dropped
    empty = viz.histogram_figure([], title="kappa", height=311)
    assert empty.layout.height == 311 and not empty.data and "kappa: no data yet" in empty.layout.annotations[0].text
    assert viz.empty_figure("x", height=200).layout.height == 200
