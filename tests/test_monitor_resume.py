"""In-process resume: loading an earlier checkpoint into a Monitor that has published further
rewinds its clock and its history, as the sidecar does for a trainer that resumed."""

from __future__ import annotations

import torch

from monitor import Monitor


def test_loading_an_earlier_checkpoint_rewinds_the_history() -> None:
    gen = torch.Generator().manual_seed(0)
    with Monitor(run="r", every=10, window=64, max_rows=64, port=None) as mon:
        saved = None
        for step in range(1, 41):
            mon.observe("s", torch.randn(8, 6, generator=gen))
            mon.step()
            if step == 20:
                saved = mon.state_dict()
        assert [s.step for s in mon.history] == [10, 20, 30, 40]
        assert saved is not None
        mon.load_state_dict(saved)                     # back to step 20
        assert mon.step_count == 20
        assert [s.step for s in mon.history] == [10, 20]
        for _ in range(10):
            mon.observe("s", torch.randn(8, 6, generator=gen))
            mon.step()
        assert [(s.step, s.resumed_from) for s in mon.history] == [(10, None), (20, None),
                                                                   (30, 40)]
        assert mon.history[-1].to_dict()["resumed_from"] == 40
