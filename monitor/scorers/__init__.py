"""Streaming scorers: one signal family per file, sharing the per-stream moment state."""

from monitor.scorers.collapse import CollapseScorer
from monitor.scorers.moments import WindowMoments
from monitor.scorers.spectrum import SpectrumScorer

__all__ = ["CollapseScorer", "SpectrumScorer", "WindowMoments"]
