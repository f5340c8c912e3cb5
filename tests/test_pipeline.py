"""The whole pipeline on real files (tiny untrained model: shapes, bytes and contracts, not accuracy)."""
import numpy as np
import pytest

from neural_core.artifact import Artifact
from neural_core.errors import ReportError
from neural_core.io import from_array

REPORT = "There is consolidation in the right lower lobe. No pleural effusion."


def _phantom(h=300, w=260):
    yy, xx = np.mgrid[:h, :w]
    img = 0.2 + 0.6 * (((yy - h / 2) / (h / 2.2)) ** 2 + ((xx - w / 2) / (w / 2.2)) ** 2 < 1)
    return from_array((img * 255).astype(np.uint8))


def test_analyze_given_report(tiny_pipeline):
    a = tiny_pipeline.analyze(_phantom(), REPORT, keep=0.1)
    assert a.report_source == "given" and a.report == REPORT
    assert not a.trained and "UNTRAINED" in a.summary()["warning"]
    assert a.grid.patch == 18 and a.mask.shape == (a.grid.rows, a.grid.cols)
    assert a.mask.sum() == int(np.ceil(0.1 * a.mask.size))
    # the kept patches are the highest-scoring ones
    assert a.patch_scores[a.mask].min() >= a.patch_scores[~a.mask].max()
    assert a.bytes.artifact_bytes == len(a.artifact.to_bytes())
    assert a.bytes.raw_pixel_bytes == 300 * 260
    assert 0.0 <= a.probability <= 1.0
    assert a.salience.per_token.shape[0] == len(a.salience.tokens) > 0
    ents = [e.text for e in a.report_graph.entities]
    assert "consolidation" in ents
    assert a.fused.num_nodes == a.mask.sum() + len(ents)


def test_no_report_is_generated_and_said_so(tiny_pipeline):
    a = tiny_pipeline.analyze(_phantom(), None, keep=0.2)
    assert a.report_source == "generated"
    assert a.summary()["report_source"] == "generated"
    # the summary (CLI --json, the store) names the map's method: the bundle's setting
    assert a.summary()["salience"]["method"] == tiny_pipeline.bundle.salience.method == a.salience.method


def test_reprune_uses_vlm_cache(tiny_pipeline):
    x = _phantom(200, 200)
    a = tiny_pipeline.analyze(x, REPORT, keep=0.1)
    b = tiny_pipeline.analyze(x, REPORT, keep=0.5)
    c = tiny_pipeline.analyze(x, REPORT, tau=0.5)
    assert b.vlm_cached and c.vlm_cached and b.timings["vlm"] == 0.0
    np.testing.assert_array_equal(a.patch_scores, b.patch_scores)
    assert b.mask.sum() > a.mask.sum()
    assert b.bytes.artifact_bytes > a.bytes.artifact_bytes
    assert (c.patch_scores[c.mask] >= 0.5).all()


def test_classifier_runs_from_the_stored_artifact_alone(tiny_pipeline, tmp_path):
    a = tiny_pipeline.analyze(_phantom(), REPORT, keep=0.1)
    a.artifact.save(tmp_path / "x.nrla")
    art = Artifact.load(tmp_path / "x.nrla", expected_model=tiny_pipeline.bundle.identity)
    p, _ = tiny_pipeline.classify(art, a.report_graph)
    assert p == pytest.approx(a.probability, abs=1e-5)
    p_img, fused = tiny_pipeline.classify(art, None, image_only=True)
    assert fused.num_nodes == a.mask.sum() and not (fused.node_type > 0).any()
    # the image-only answer from the stored artifact is the image classifier's answer on the study
    a_img = tiny_pipeline.analyze(_phantom(), REPORT, keep=0.1, image_only=True)
    assert a_img.classifier == "image" and a.classifier in ("report", "oracle")
    assert p_img == pytest.approx(a_img.probability, abs=1e-5)
    assert p_img != pytest.approx(p, abs=1e-6)          # another classifier scored it


def test_reconstruct_is_exact_on_kept_patches(tiny_pipeline):
    x = _phantom()
    a = tiny_pipeline.analyze(x, REPORT, keep=0.3)
    rec = a.artifact.reconstruct()
    for r, c in a.kept_patches():
        y0, x0, y1, x1 = a.grid.box(r, c)
        np.testing.assert_array_equal(rec[y0:y1, x0:x1], x.raw[y0:y1, x0:x1])


def test_report_limits(tiny_pipeline):
    with pytest.raises(ReportError, match="limit"):
        tiny_pipeline.analyze(_phantom(), "x" * 1_000_001)
    with pytest.raises(ReportError):
        tiny_pipeline.analyze(_phantom(), 42)


@pytest.mark.parametrize("name", ["cr_chest_pa_monochrome2.dcm", "cr_chest_pa_monochrome1.dcm",
                                  "cr_chest_pa_j2k_15bit.dcm"])
def test_real_dicoms(tiny_pipeline, dicom_dir, name):
    a = tiny_pipeline.analyze(dicom_dir / name, REPORT, keep=0.05)
    s = a.summary()
    assert s["bytes"]["original_file_bytes"] == (dicom_dir / name).stat().st_size
    assert s["bytes"]["artifact_bytes"] < s["bytes"]["raw_pixel_bytes"]
    assert s["image"]["format"] == "dicom"
    rec = a.artifact.reconstruct()
    assert rec.dtype == a.xray.raw.dtype and rec.shape == a.xray.raw.shape


def test_real_kermany_and_covid(tiny_pipeline, kermany_dir, covid_dir):
    import pandas as pd

    for p in sorted((kermany_dir / "PNEUMONIA").glob("*.jpeg"))[:2]:
        a = tiny_pipeline.analyze(p, None, keep=0.1)
        assert a.grid.patch == 16 and a.mask.sum() == 20
    meta = pd.read_csv(covid_dir / "metadata.csv").head(3)
    for row in meta.itertuples():
        a = tiny_pipeline.analyze(covid_dir / "images" / row.filename, row.clinical_notes, keep=0.1)
        assert a.report_source == "given" and a.bytes.artifact_bytes > 0
