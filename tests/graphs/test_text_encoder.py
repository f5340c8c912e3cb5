"""Text encoder: the bundled MiniLM, offline, 384-d, unit-norm, cached."""
from __future__ import annotations

import numpy as np
import pytest

from neural_core.errors import ModelLoadError
from neural_core.graphs import text_encoder as te
from neural_core.graphs.text_encoder import TextEncoder, default_model_dir, get_text_encoder


@pytest.fixture(scope="module")
def enc() -> TextEncoder:
    return get_text_encoder()


def test_default_is_bundled_minilm(enc):
    assert enc.path == default_model_dir().resolve()
    assert enc.dim == 384
    assert get_text_encoder() is enc                       # cached
    assert get_text_encoder(str(default_model_dir())) is enc


def test_shape_dtype_norm(enc):
    x = enc.encode(["pleural effusion", "right lower lobe", "consolidation"])
    assert x.shape == (3, 384) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    assert np.isfinite(x).all()
    empty = enc.encode([])
    assert empty.shape == (0, 384) and empty.dtype == np.float32
    assert enc.encode([""]).shape == (1, 384)


def test_similar_phrases_are_closer(enc):
    a, b, c, d = enc.encode(["pleural effusion", "fluid in the pleural space", "rib fracture", "heart"])
    assert a @ b > a @ c
    assert a @ b > a @ d
    p, q, r = enc.encode(["pneumonia", "lung infection", "pacemaker"])
    assert p @ q > p @ r


def test_cache_and_order(enc):
    texts = ["effusion", "lungs", "effusion", "nodule"]
    x = enc.encode(texts)
    np.testing.assert_array_equal(x[0], x[2])
    y = enc.encode(["nodule", "effusion"])
    np.testing.assert_allclose(y[0], x[3], atol=1e-6)
    np.testing.assert_allclose(y[1], x[0], atol=1e-6)
    # a batch gives the same vectors as single calls (padding does not leak into the mean)
    z = enc.encode(["a much longer phrase about bilateral lower lobe airspace opacities", "lungs"])
    np.testing.assert_allclose(z[1], enc.encode(["lungs"])[0], atol=1e-5)
    # returned arrays are copies: editing them does not corrupt the cache
    z[:] = 0
    assert np.linalg.norm(enc.encode(["lungs"])[0]) == pytest.approx(1.0, abs=1e-5)


def test_cache_is_bounded(enc, monkeypatch):
    assert enc._cache.maxsize == te.CACHE_SIZE
    monkeypatch.setattr(enc._cache, "maxsize", 3)
    z = enc.encode([f"phrase number {i}" for i in range(6)])
    assert len(enc._cache) == 3 and z.shape[0] == 6 and np.isfinite(z).all()
    assert "phrase number 5" in enc._cache and "phrase number 0" not in enc._cache     # least recent forgotten


def test_bad_inputs(enc):
    with pytest.raises(TypeError):
        enc.encode("pleural effusion")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        enc.encode(["ok", None])  # type: ignore[list-item]


def test_bad_model_dirs(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match="not found"):
        TextEncoder(tmp_path / "missing")
    with pytest.raises(ModelLoadError, match="config.json"):
        TextEncoder(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ModelLoadError, match="cannot load"):
        TextEncoder(tmp_path)
    monkeypatch.setenv(te.ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(ModelLoadError):
        get_text_encoder()


def test_env_var_selects_model(enc, monkeypatch):
    monkeypatch.setenv(te.ENV_VAR, str(default_model_dir()))
    assert get_text_encoder() is enc
