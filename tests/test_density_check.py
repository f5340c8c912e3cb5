"""density_check on a tiny hand-made cache: a dense cell in the named zone is found by the density map."""
import json

import numpy as np

from neural_core.eval import density_check
from neural_core.models.density import DensityAtlas
from neural_core.models.lung import ZONES


def _cache(tmp_path, rng):
    G = 24
    zones = np.zeros((6, G * G), np.float16)
    for r in range(4, 20):
        level = ("upper", "middle", "lower")[min(2, (r - 4) * 3 // 16)]
        for c in range(3, 10):
            zones[ZONES.index(("right", level)), r * G + c] = 1
        for c in range(14, 21):
            zones[ZONES.index(("left", level)), r * G + c] = 1
    lung = zones.astype(np.float32).sum(0)
    normal = np.where(lung > 0, -600.0, 200.0)
    for which, n in (("train", 12), ("val", 6)):
        recs, cells = [], []
        for i in range(n):
            c = normal + rng.normal(0, 10, G * G)
            if i % 2:                                   # a covid note naming the left lower zone, dense there
                c[17 * G + 17] = c[17 * G + 18] = c[18 * G + 17] = -150.0
                recs.append({"dataset": "covid-cxr", "report": "Consolidation in the left lower zone.", "pneumonia": 1})
            else:
                recs.append({"dataset": "kermany", "report": "Normal chest.", "pneumonia": 0})
            cells.append(c)
        (tmp_path / f"features_{which}.json").write_text(json.dumps(recs))
        np.savez(tmp_path / f"features_{which}.npz", tokens=rng.standard_normal((n, G * G, 8)).astype(np.float16),
                 lung=np.repeat(lung[None], n, 0).astype(np.float16), zones=np.repeat(zones[None], n, 0))
        np.save(tmp_path / f"cells_{which}.npy", np.stack(cells).astype(np.float32))
    items = [(normal + rng.normal(0, 10, G * G), zones) for _ in range(20)]
    DensityAtlas.fit(items, grid=G).save(tmp_path)


def test_density_map_finds_the_named_zone_and_mil_runs(tmp_path, capsys):
    _cache(tmp_path, np.random.default_rng(0))
    assert density_check.main(["--features", str(tmp_path), "--data", str(tmp_path / "none")]) == 0
    out = capsys.readouterr().out
    assert "n = 9" in out                                     # 6 + 3 covid notes naming a zone
    line = next(x for x in out.splitlines() if "zone agreement density" in x)
    assert float(line.split()[-1]) == 1.0
    assert "mil head: validation AUC" in out
