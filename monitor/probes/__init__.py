"""Probes: sources read at publish rather than captured by hooks (torch).

:mod:`monitor.probes.weights` (weight and gradient statistics, ``Monitor.watch_weights``) and
:mod:`monitor.probes.curvature` (the optional curvature probe: sharpness, Lyapunov exponent).
"""
