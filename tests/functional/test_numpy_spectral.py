"""The window functions on numpy arrays (the sidecar's publish) equal the torch scorers' publish
to 1e-10 on the edge windows (one row, all-zero rows): the same code
(``monitor.functional.spectral``, array API) on both array libraries. Regular windows (n > d,
n < d, power law, low rank, collapsed, wraparound) are tests/test_streaming_parity.py's: there
the stream, numpy and torch all equal one numpy reference.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from monitor.scorers import CollapseScorer, SpectrumScorer, WindowMoments
from monitor.functional.spectral import window_collapse_signals, window_spectral_signals


def _windows() -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [
        ("one row", rng.standard_normal((1, 8))),
        ("zeros", np.zeros((50, 6))),
    ]


@pytest.mark.parametrize("name,z", _windows(), ids=[w[0] for w in _windows()])
def test_numpy_publish_matches_torch(name: str, z: np.ndarray) -> None:
    z32 = z.astype(np.float32)
    m = WindowMoments(z.shape[1], window=max(4096, z.shape[0]))
    m.update(torch.from_numpy(z32))
    m.settle()
    ref = {k: float(v) for k, v in SpectrumScorer().compute(m).items() if k != "spectrum"}
    ref.update({k: float(v) for k, v in CollapseScorer().compute(m).items()})
    s, zsum, nsum, nsq, n = (m.s.numpy(), m.zsum.numpy(), m.nsum.numpy(), m.nsq.numpy(),
                             float(m.n))
    values = window_spectral_signals(s, zsum, n)
    spectrum = values.pop("spectrum")
    assert isinstance(spectrum, np.ndarray)
    values.update(window_collapse_signals(s, zsum, nsum, nsq, n))
    got = {key: float(v) for key, v in values.items()}
    assert set(got) == set(ref)
    for key, value in ref.items():
        if math.isnan(value):
            assert math.isnan(got[key]), (name, key, got[key])
        else:
            assert got[key] == pytest.approx(value, rel=1e-10, abs=1e-12), (name, key)
    ref_spectrum = SpectrumScorer().compute(m)["spectrum"].numpy()
    np.testing.assert_allclose(spectrum, ref_spectrum, rtol=1e-10,
                               atol=1e-12 * max(ref_spectrum.max(), 1e-300))
