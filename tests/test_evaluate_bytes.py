"""`neural evaluate --sets fullsize,dicom`: AUC vs bytes on full-size sources, per-source sensitivity /
specificity, bytes per study by source type, and the one AUC-vs-bytes chart - on a tiny hand-made data folder
(covid-cxr + JSRT + a 16-bit DICOM laid out like ../shared/data) and a tiny untrained bundle."""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from neural_core.bundle import untrained_bundle
from neural_core.config import tiny_report_config
from neural_core.eval.external import (FULLSIZE_CONFOUND, bytes_by_source_type, fullsize_records, per_source_rows,
                                       source_type)
from neural_core.eval.report import chart_series, render_html, render_png, write_outputs
from neural_core.eval.run import EvalConfig, parse_sets, run_evaluation
from tests.conftest import FakeTextEncoder

KEEPS = (1.0, 0.1)
CODECS = ("jpeg", "webp")


def _xray(h: int, w: int, seed: int, sick: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    img = 0.25 + 0.55 * (np.exp(-((x - 0.3) / 0.15) ** 2 - ((y - 0.5) / 0.3) ** 2)
                         + np.exp(-((x - 0.7) / 0.15) ** 2 - ((y - 0.5) / 0.3) ** 2))
    if sick:
        img += 0.3 * np.exp(-((x - 0.3) / 0.08) ** 2 - ((y - 0.65) / 0.08) ** 2)
    img += rng.normal(0, 0.03, (h, w))
    return np.clip(img * 200, 0, 255).astype(np.uint8)


def _dicom16(arr: np.ndarray) -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PhotometricInterpretation, ds.SamplesPerPixel = "CR", "MONOCHROME2", 1
    ds.Rows, ds.Columns = arr.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = arr.astype("<u2").tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    import torch

    before = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NEURAL_THREADS", "1")
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """covid-cxr: test patients c1..c3 positive (2 JPEG, 1 PNG), c4 'No Finding' (PNG), c5 'todo' (left out),
    c6 a training patient (left out); JSRT: 3 nodule-free JPEGs, 1 nodule film (left out); one 16-bit DICOM."""
    root = tmp_path_factory.mktemp("fullsize")
    (root / "covid-cxr" / "images").mkdir(parents=True)
    rows = []
    spec = [("1", "COVID-19", "a.jpg", True), ("2", "Klebsiella", "b.jpeg", True), ("3", "Pneumonia", "c.png", True),
            ("4", "No Finding", "d.png", False), ("5", "todo", "e.png", True), ("6", "COVID-19", "f.jpg", True)]
    for i, (pid, finding, name, sick) in enumerate(spec):
        img = Image.fromarray(_xray(280 + 8 * i, 264, i, sick))
        img.save(root / "covid-cxr" / "images" / name, **({"quality": 85} if name.endswith(("jpg", "jpeg")) else {}))
        rows.append({"patientid": pid, "finding": finding, "view": "PA", "folder": "images", "filename": name,
                     "clinical_notes": "Notes."})
    with (root / "covid-cxr" / "metadata.csv").open("w", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    (root / "jsrt" / "images").mkdir(parents=True)
    jrows = []
    for i, nod in enumerate(["none", "none", "none", "benign"]):
        name = f"images/JPC{'NN' if nod == 'none' else 'LN'}{i:03d}.jpg"
        Image.fromarray(_xray(320, 320, 20 + i, False)).save(root / "jsrt" / name, quality=88)
        jrows.append({"image": name, "nodule": nod})
    with (root / "jsrt" / "metadata.csv").open("w", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=["image", "nodule"])
        wr.writeheader()
        wr.writerows(jrows)
    (root / "dicom").mkdir()
    deep = (_xray(200, 176, 9, False).astype(np.uint16) * 250 + 17)
    (root / "dicom" / "synthetic_16bit.dcm").write_bytes(_dicom16(deep))
    split = {f"covid-{p}": ("train" if p == "6" else "test") for p in "123456"}
    (root / "split.json").write_text(json.dumps({"seed": 0, "patients": split}))
    return root


@pytest.fixture(scope="module")
def evaluated(data):
    bundle = untrained_bundle(tiny_report_config())
    cfg = EvalConfig(data=str(data), split=str(data / "split.json"), out=str(data / "out"), keeps=KEEPS,
                     bootstrap=50, seed=0, batch=8, codecs=CODECS, save_artifacts=0, sets=("fullsize", "dicom"))
    res = run_evaluation(cfg, bundle=bundle, text_encoder=FakeTextEncoder())
    paths = write_outputs(res, cfg.out)
    return res, paths


def test_fullsize_set_is_test_patients_with_labels_and_nodule_free_jsrt(data):
    split = json.loads((data / "split.json").read_text())["patients"]
    recs = fullsize_records(data, split)
    got = sorted((r.dataset, Path(r.image).name, r.pneumonia) for r in recs)
    assert got == [("covid-cxr", "a.jpg", 1), ("covid-cxr", "b.jpeg", 1), ("covid-cxr", "c.png", 1),
                   ("covid-cxr", "d.png", 0), ("jsrt", "JPCNN000.jpg", 0), ("jsrt", "JPCNN001.jpg", 0),
                   ("jsrt", "JPCNN002.jpg", 0)]
    assert all(r.report is None for r in recs)                 # no oracle on this set


def test_auc_vs_bytes_rows_per_keep_and_method(evaluated):
    res, _ = evaluated
    fs = res["fullsize"]
    assert fs["n"] == 7 and fs["composition"] == {"covid-cxr negative": 1, "covid-cxr positive": 3,
                                                   "jsrt negative": 3}
    assert "CONFOUNDED BY SOURCE" in fs["note"] and fs["note"] == FULLSIZE_CONFOUND
    assert res["main"] == [] and res["meta"]["sets"] == ["fullsize", "dicom"]       # internal set not run
    conds = sorted({r["condition"] for r in fs["main"]})
    assert conds == ["generated_report", "image_only"]        # no oracle, no ablation on this set
    assert sorted((r["keep"], r["codec"]) for r in fs["codecs"]) == sorted((k, c) for k in KEEPS for c in CODECS)
    per = fs["per_study"]
    for r in fs["main"]:
        kk = f"{r['keep']:g}"
        assert (r["n"], r["n_pos"], r["n_neg"]) == (7, 3, 4)
        assert r["mean_artifact_bytes"] == pytest.approx(np.mean([s["keeps"][kk]["artifact_bytes"] for s in per]))
        assert r["auc"] is None or 0.0 <= r["auc"] <= 1.0
    for r in fs["codecs"]:
        kk = f"{r['keep']:g}"
        items = [s["keeps"][kk]["codecs"][r["codec"]] for s in per]
        assert r["mean_bytes"] == pytest.approx(np.mean([c["bytes"] for c in items]))
        assert all(c["budget"] == s["keeps"][kk]["artifact_bytes"] for c, s in zip(items, per))
    # smaller keep, fewer bytes
    b = {r["keep"]: r["mean_artifact_bytes"] for r in fs["main"] if r["condition"] == "image_only"}
    assert b[0.1] < b[1.0]


def test_per_source_sensitivity_and_specificity_match_the_per_study_scores(evaluated):
    res, _ = evaluated
    fs = res["fullsize"]
    thr = res["meta"]["thresholds"]["image"]
    row = next(r for r in fs["per_source"] if r["method"] == "image_only" and r["keep"] == 0.1)
    assert set(row) - {"keep", "method"} == {"covid-cxr sensitivity", "covid-cxr specificity", "jsrt specificity"}
    covid_pos = [s["keeps"]["0.1"]["image_only"] for s in fs["per_study"] if s["dataset"] == "covid-cxr"
                 and s["label"] == 1]
    jsrt = [s["keeps"]["0.1"]["image_only"] for s in fs["per_study"] if s["dataset"] == "jsrt"]
    assert row["covid-cxr sensitivity"]["n"] == 3 and row["jsrt specificity"]["n"] == 3
    assert row["covid-cxr sensitivity"]["value"] == pytest.approx(np.mean([p >= thr for p in covid_pos]))
    assert row["jsrt specificity"]["value"] == pytest.approx(np.mean([p < thr for p in jsrt]))
    assert {r["method"] for r in fs["per_source"]} == {"image_only", "generated_report", *CODECS}


def test_bytes_split_by_source_type_and_dicom_bytes(evaluated, data):
    res, _ = evaluated
    by = {(r["source_type"], r["keep"]): r for r in res["bytes_by_source_type"]}
    assert {t for t, _ in by} == {"JPEG full-size", "PNG full-size", "DICOM"}
    assert by[("JPEG full-size", 1.0)]["n"] == 5 and by[("PNG full-size", 1.0)]["n"] == 2
    jpeg_sizes = [(data / "covid-cxr" / "images" / n).stat().st_size for n in ("a.jpg", "b.jpeg")]
    jpeg_sizes += [(data / "jsrt" / "images" / f"JPCNN00{i}.jpg").stat().st_size for i in range(3)]
    assert by[("JPEG full-size", 1.0)]["mean_source_bytes"] == pytest.approx(np.mean(jpeg_sizes))
    dic = res["dicom_bytes"]
    assert len(dic) == 1 and dic[0]["bit_depth"] == 16 and set(dic[0]["keeps"]) == {"1", "0.1"}
    d = dic[0]["keeps"]
    assert d["0.1"]["artifact_bytes"] < d["1"]["artifact_bytes"]
    assert d["1"]["original_file_bytes"] == (data / "dicom" / "synthetic_16bit.dcm").stat().st_size
    assert by[("DICOM", 0.1)]["mean_artifact_bytes"] == d["0.1"]["artifact_bytes"]


def test_outputs_say_the_set_is_confounded_and_chart_has_a_line_per_method(evaluated):
    res, paths = evaluated
    md, bmd = paths["md"].read_text(), paths["bytes_md"].read_text()
    for text in (md, bmd):
        assert "MIXES SOURCES" in text and "Bytes per study by source type" in text and "DICOMs" in text
        assert "jsrt specificity" in text and "covid-cxr sensitivity" in text
    series = chart_series(json.loads(paths["json"].read_text()))
    finite = {(s["set"], s["method"]) for s in series}
    assert finite <= {("fullsize", m) for m in ("image_only", "generated_report", *CODECS)}
    assert len(series) >= 2                                    # NEURAL and at least one codec have an AUC
    html = paths["html"].read_text()
    assert '"height":600' in html and "MIXES SOURCES" not in html and "confounded" in html
    render_html(json.loads(paths["json"].read_text()), paths["html"].with_name("again.html"))
    fig = render_html.figure
    assert [t.name for t in fig.data] == [x["name"] for x in series] and {t.line.dash for t in fig.data} == {"dash"}
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert res["meta"]["chart_png"] in ("plotly/kaleido", "matplotlib")


def test_chart_series_and_byte_table_on_hand_made_rows(tmp_path):
    """No model: hand-written rows -> the exact lines, their order by bytes, colours by method, dash by set."""
    def row(keep, auc, b, **kw):
        return {"keep": keep, "auc": auc, "ci_low": auc - 0.05, "ci_high": min(1.0, auc + 0.05), "n": 10,
                "n_pos": 5, "n_neg": 5, **kw}

    res = {"meta": {"sets": ["internal", "fullsize"], "keeps": [1.0, 0.1]}, "warnings": [],
           "main": [row(1.0, 0.9, None, condition="image_only", label="NEURAL image-only", mean_artifact_bytes=6000.0),
                    row(0.1, 0.8, None, condition="image_only", label="NEURAL image-only", mean_artifact_bytes=1500.0),
                    row(0.1, 0.99, None, condition="oracle_given_report", label="oracle", mean_artifact_bytes=1.0)],
           "codecs": [row(1.0, 0.85, None, codec="jpeg", label="JPEG", mean_bytes=5900.0),
                      row(0.1, float("nan"), None, codec="jpeg", label="JPEG", mean_bytes=1400.0)],
           "fullsize": {"main": [row(1.0, 0.7, None, condition="image_only", label="NEURAL image-only",
                                     mean_artifact_bytes=60000.0)], "codecs": []}}
    s = chart_series(res)
    assert [(x["set"], x["method"], x["x"]) for x in s] == [("internal", "image_only", [1500.0, 6000.0]),
                                                          ("internal", "jpeg", [5900.0]),
                                                          ("fullsize", "image_only", [60000.0])]
    assert s[0]["y"] == [0.8, 0.9] and s[0]["keeps"] == [0.1, 1.0]             # sorted by bytes
    render_html(res, tmp_path / "c.html")
    fig = render_html.figure
    assert [t.name for t in fig.data] == [x["name"] for x in s]
    assert [t.line.dash for t in fig.data] == ["solid", "solid", "dash"]
    assert fig.data[0].line.color == fig.data[2].line.color != fig.data[1].line.color
    assert fig.layout.height == 600
    assert render_png(res, tmp_path / "c.png") in ("plotly/kaleido", "matplotlib")
    assert (tmp_path / "c.png").stat().st_size > 1000
    # bytes by source type: means, ratio and the keep x source + 1 KB count, by hand
    studies = [{"source_type": "JPEG 224²", "keeps": {"0.1": {"artifact_bytes": 1500, "original_file_bytes": 6000}}},
               {"source_type": "JPEG 224²", "keeps": {"0.1": {"artifact_bytes": 1700, "original_file_bytes": 6000}}}]
    (r,) = bytes_by_source_type(studies, (0.1,))
    assert (r["n"], r["mean_artifact_bytes"], r["n_within_target"]) == (2, 1600.0, 1)     # 1700 > 600 + 1024
    assert r["mean_ratio"] == pytest.approx((0.25 + 1700 / 6000) / 2)


def test_source_types_sets_and_per_source_rows():
    assert source_type("jpeg", 224, 224) == "JPEG 224²" and source_type("jpeg", 1024, 1024) == "JPEG full-size"
    assert source_type("png", 224, 224) == "PNG full-size" and source_type("dicom", 10, 10) == "DICOM"
    assert parse_sets("fullsize,dicom,fullsize") == ("fullsize", "dicom")
    with pytest.raises(ValueError, match="--sets"):
        parse_sets("internal,jsrt")
    studies = [{"dataset": "a", "label": 1, "keeps": {"1": {"image_only": p}}} for p in (0.9, 0.2, 0.6)] + \
              [{"dataset": "b", "label": 0, "keeps": {"1": {"image_only": p}}} for p in (0.1, 0.7)]
    rows = per_source_rows(studies, (1.0,), (), {"image": 0.5, "report": 0.5})
    r = next(x for x in rows if x["method"] == "image_only")
    assert r["a sensitivity"]["value"] == pytest.approx(2 / 3) and r["b specificity"]["value"] == 0.5
    assert math.isnan(next(x for x in rows if x["method"] == "generated_report")["a sensitivity"]["value"])
