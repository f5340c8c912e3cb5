"""The transfer-learning baseline: stored coefficients reproduce scikit-learn's probabilities."""
import numpy as np

from neural_core.models.baseline import TransferBaseline


def test_baseline_matches_sklearn_and_round_trips(tmp_path):
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    X = rng.normal(size=(80, 6)).astype(np.float32)
    y = (X[:, 0] + 0.5 * rng.normal(size=80) > 0).astype(int)
    lr = LogisticRegression(C=0.5, class_weight="balanced").fit(X, y)
    b = TransferBaseline(lr.coef_.reshape(-1), float(lr.intercept_[0]), threshold=0.4)
    np.testing.assert_allclose(b.predict_features(X), lr.predict_proba(X)[:, 1], rtol=1e-5)
    b.save(tmp_path / "baseline")
    b2 = TransferBaseline.load(tmp_path / "baseline")
    np.testing.assert_allclose(b2.predict_features(X), lr.predict_proba(X)[:, 1], rtol=1e-5)
    assert b2.threshold == 0.4 and b2.size == 224
