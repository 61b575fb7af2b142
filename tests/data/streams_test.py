"""ftlab.data.streams: river's bundled streams, sizes as in DATA.md, causal standardisation."""

import numpy as np
import pytest
from river import preprocessing

from ftlab.data import streams


@pytest.mark.parametrize(
    "name, num, dim, positives",
    [("phishing", 1250, 9, 548), ("trump", 1001, 6, None), ("shuttle", 49097, 9, 3511)],
)
def test_sizes_match_data_md(name, num, dim, positives):
    x, y, columns = streams.load(name)
    assert x.shape == (num, dim) and y.shape == (num,) and len(columns) == dim
    assert x.dtype == np.float32 and np.isfinite(x).all() and np.isfinite(y).all()
    if positives is None:  # TrumpApproval: approval ratings in percent, in time order
        assert 30 < y.min() < y.max() < 60
        assert np.all(np.diff(x[:, columns.index("ordinal_date")]) > 0)
    else:
        np.testing.assert_array_equal(np.unique(y), [0.0, 1.0])
        assert int(y.sum()) == positives


def test_rows_follow_river_order_and_columns():
    x, y, columns = streams.load("phishing", limit=5)
    for i, (features, label) in enumerate(streams.dataset("phishing")):
        if i == 5:
            break
        np.testing.assert_array_equal(x[i], [features[c] for c in columns])
        assert y[i] == float(label)


def test_running_standardize_is_causal_and_matches_river():
    x, _, columns = streams.load("trump", limit=60)
    z = streams.running_standardize(x)
    # Causal: changing the future leaves the past alone.
    future = x.copy()
    future[40:] *= 100.0
    np.testing.assert_array_equal(streams.running_standardize(future)[:40], z[:40])
    # river's StandardScaler after learn_one(x_t), applied to x_t.
    scaler = preprocessing.StandardScaler()
    for i, row in enumerate(x.astype(np.float64)):
        features = dict(zip(columns, row, strict=True))
        scaler.learn_one(features)
        expected = scaler.transform_one(features)
        np.testing.assert_allclose(z[i], [expected[c] for c in columns], rtol=1e-4, atol=1e-5)
    assert np.all(z[0] == 0.0)  # zero variance so far maps to 0, as in river


def test_unknown_stream_is_named():
    with pytest.raises(ValueError, match="unknown stream 'elec2'; known: phishing, trump, shuttle"):
        streams.load("elec2")
