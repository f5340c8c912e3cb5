"""``validate-salience`` manifests from the shared data, split by patient like the bundle.

    python -m neural_core.eval.manifests --data ../shared/data --out runs/manifests \
        [--split assets/default_model/split.json --which val|test|all] [--jsrt-lung without-nodule|all]

Writes (paths in the CSVs are absolute; the data are never copied, only listed):

* ``covid_lungs_<which>.csv``: covid-cxr images with a lung-field mask (``covid-cxr/lung_masks.csv``),
  ``report`` = the image's clinical notes (they often name a zone: the zone-agreement measure), ``label`` = the
  ``finding``;
* ``jsrt_lungs_<which>.csv``: JSRT films, ``mask`` = ``left_lung|right_lung`` (the union), ``report`` = the text the
  model was trained with for a film without pneumonia (the label template,
  :func:`neural_core.data.studies.label_template`); by default only the 93 films *without* a nodule
  (``--jsrt-lung all``: every film), because the nodule films are scored in the next file with the same mask;
* ``jsrt_nodules_<which>.csv``: the 154 JSRT films with a nodule, ``mask`` = both lungs, ``report`` = one sentence
  naming the nodule, its side and zone ("Pulmonary nodule in the right upper zone."; side and zone from the SCR lung
  masks at the nodule centre, the side nearest to it when the centre lies outside both masks, e.g. behind the
  heart), and ``x, y, diameter_px`` (the nodule circle, 1024-px image pixels).

**Split.** A patient in ``--split`` (default: the bundle's ``split.json``) goes where the split puts it; ``--which``
selects ``val`` or ``test`` patients (``all``: every patient, no split). The bundle's split holds covid-cxr and
Kermany patients only; JSRT films (one patient each) were never seen by the report model, so they are split
50/50 into val and test by :func:`neural_core.data.studies.patient_split` with the bundle split's seed. (The lung
model was trained on a part of the JSRT and covid-cxr masks; its baseline is optimistic on those.)
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from ..utils import atomic_write_text

__all__ = ["covid_rows", "jsrt_rows", "nodule_report", "main"]


def _split(path: str | Path | None) -> tuple[dict[str, str], int]:
    if path is None:
        return {}, 13
    d = json.loads(Path(path).read_text())
    return dict(d["patients"]), int(d.get("seed", 13))


def _jsrt_split(names: list[str], seed: int) -> dict[str, str]:
    """JSRT film -> "val" | "test" (seeded 50/50 by patient; one film per patient)."""
    from ..data.studies import StudyRecord, patient_split

    recs = [StudyRecord(None, None, "none", 0, f"jsrt-{n}", "jsrt") for n in names]
    return patient_split(recs, seed=seed, val=0.5, test=0.5)


def covid_rows(data: Path, split: dict[str, str], which: str) -> list[dict]:
    """covid-cxr images with a lung mask, clinical notes as ``report``; ``which`` in val / test / all."""
    import pandas as pd

    root = data / "covid-cxr"
    table = root / "lung_masks.csv"
    if not table.is_file():
        return []
    meta = pd.read_csv(root / "metadata.csv")
    by_file = {str(r.filename): r for r in meta.itertuples(index=False)}
    out = []
    with table.open(newline="") as fh:
        for r in csv.DictReader(fh):
            m = by_file.get(Path(r["image"]).name)
            if m is None:
                continue
            pid = f"covid-{m.patientid}"
            if which != "all" and split.get(pid) != which:
                continue
            notes = m.clinical_notes if isinstance(m.clinical_notes, str) else ""
            out.append({"image": str((root / r["image"]).resolve()), "mask": str((root / r["mask"]).resolve()),
                        "label": str(m.finding), "report": " ".join(notes.split()), "patient_id": pid})
    return out


def nodule_report(left: np.ndarray, right: np.ndarray, x: float, y: float) -> str:
    """One sentence naming the nodule, the patient's side and the zone (thirds of that lung's own height).

    ``left``/``right``: the patient's lungs (``right`` on the image's left) as (H, W) bool; ``x, y`` the centre."""
    from ..models.lung import ZONES, zone_map

    h, w = right.shape
    xi, yi = int(min(max(round(x), 0), w - 1)), int(min(max(round(y), 0), h - 1))
    z = int(zone_map((right, left))[yi, xi])
    if z:
        side, level = ZONES[z - 1]
    else:   # behind the heart / below the dome: the nearer lung, and the third of its height the centre is in
        dist = {}
        for name, m in (("right", right), ("left", left)):
            ys, xs = np.nonzero(m)
            dist[name] = float(np.min((xs - x) ** 2 + (ys - y) ** 2)) if xs.size else np.inf
        side = min(dist, key=dist.get)
        m = right if side == "right" else left
        rows = np.flatnonzero(m.any(axis=1))
        if rows.size == 0:
            return f"Pulmonary nodule in the {side} lung."
        third = int(np.clip((y - rows[0]) * 3 // max(rows[-1] - rows[0] + 1, 1), 0, 2))
        level = ("upper", "middle", "lower")[third]
    return f"Pulmonary nodule in the {side} {level} zone."


def jsrt_rows(data: Path, seed: int, which: str, *, nodules: bool, lung: str = "without-nodule") -> list[dict]:
    """JSRT rows: ``nodules=True`` the nodule films (report naming the nodule, circle columns), else the lung rows
    (label-template report; ``lung="all"`` every film, else the nodule-free films only)."""
    import cv2

    from ..data.studies import label_template

    root = data / "jsrt"
    if not (root / "metadata.csv").is_file():
        return []
    with (root / "metadata.csv").open(newline="") as fh:
        meta = list(csv.DictReader(fh))
    split = _jsrt_split([Path(r["image"]).stem for r in meta], seed)
    out = []
    for r in meta:
        stem = Path(r["image"]).stem
        has = r["nodule"] != "none"
        if which != "all" and split.get(f"jsrt-{stem}") != which:
            continue
        if nodules != has and (nodules or lung != "all"):
            continue
        row = {"image": str((root / r["image"]).resolve()),
               "mask": f"{(root / r['left_lung']).resolve()}|{(root / r['right_lung']).resolve()}",
               "label": r["nodule"], "patient_id": f"jsrt-{stem}"}
        if nodules:
            left = cv2.imread(str(root / r["left_lung"]), cv2.IMREAD_GRAYSCALE) > 0
            right = cv2.imread(str(root / r["right_lung"]), cv2.IMREAD_GRAYSCALE) > 0
            x, y, d = float(r["x"]), float(r["y"]), float(r["diameter_px"])
            row.update(report=nodule_report(left, right, x, y), x=x, y=y, diameter_px=d)
        else:
            row["report"] = label_template(0, None, Path(r["image"]).name)
        out.append(row)
    return out


def _write(path: Path, rows: list[dict]) -> None:
    cols = ["image", "mask", "label", "report", "patient_id"] + (["x", "y", "diameter_px"]
                                                                 if rows and "x" in rows[0] else [])
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m neural_core.eval.manifests", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--out", default="runs/manifests")
    ap.add_argument("--split", default="assets/default_model/split.json",
                    help="the bundle's patient split (split.json); 'none' with --which all")
    ap.add_argument("--which", choices=("val", "test", "all"), default="val")
    ap.add_argument("--jsrt-lung", choices=("without-nodule", "all"), default="without-nodule")
    a = ap.parse_args(argv)
    data, out = Path(a.data), Path(a.out)
    if not data.is_dir():
        raise SystemExit(f"{data} is not a folder (the shared data, see its README)")
    split, seed = _split(None if a.split == "none" else a.split)
    if a.which != "all" and not split:
        raise SystemExit("--which val|test needs --split")
    out.mkdir(parents=True, exist_ok=True)
    written = {f"covid_lungs_{a.which}.csv": covid_rows(data, split, a.which),
               f"jsrt_lungs_{a.which}.csv": jsrt_rows(data, seed, a.which, nodules=False, lung=a.jsrt_lung),
               f"jsrt_nodules_{a.which}.csv": jsrt_rows(data, seed, a.which, nodules=True)}
    for name, rows in written.items():
        if rows:
            _write(out / name, rows)
            print(f"{out / name}: {len(rows)} rows")
        else:
            print(f"{name}: no rows (data absent or no patient in '{a.which}'), not written")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
