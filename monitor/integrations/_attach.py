"""What both framework callbacks share: validate the layer list, build and attach a Monitor,
publish what is pending when training ends."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from monitor.monitor import Monitor
from monitor.snapshot import Snapshot

Layer = str | nn.Module


def check_layers(layers: Sequence[Layer] | None) -> tuple[Layer, ...]:
    """``layers`` as a tuple of module names / modules, or a clear error."""
    if layers is None:
        return ()
    if isinstance(layers, (str, nn.Module)):
        layers = [layers]
    out = tuple(layers)
    for layer in out:
        if not isinstance(layer, (str, nn.Module)):
            raise TypeError("layers must be module names (str) or torch.nn.Module objects, "
                            f"got {type(layer).__name__}")
    return out


def check_port(port: int | None) -> int | None:
    """A TCP port (0: any free one) or None (no server)."""
    if port is not None and (isinstance(port, bool) or not isinstance(port, int)
                             or not 0 <= port <= 65535):
        raise ValueError(f"port must be 0–65535 or None, got {port!r}")
    return port


def check_monitor_kwargs(monitor_kwargs: dict[str, Any]) -> None:
    """Build (and close) a throwaway Monitor so bad arguments fail at once; without the sink,
    which would connect to a sidecar."""
    probe = {k: v for k, v in monitor_kwargs.items() if k not in ("sink", "token")}
    Monitor(port=None, **probe).close()


def check_activations(activations: bool | Sequence[str]) -> bool | tuple[str, ...]:
    """``activations``: True (every activation module), False, or a list of module names."""
    if isinstance(activations, bool):
        return activations
    if isinstance(activations, str):
        return (activations,)
    names = tuple(activations)
    if not all(isinstance(n, str) for n in names):
        raise TypeError(f"activations must be True/False or module names, got {activations!r}")
    return names


def attach(model: nn.Module, layers: tuple[Layer, ...], activations: bool | tuple[str, ...],
           serve: bool, port: int | None, monitor_kwargs: dict[str, Any]) -> Monitor:
    """A new Monitor on ``model``: each of ``layers`` watched (a name is a submodule path, a
    module is named by its path in ``model``) and, if asked, its activation layers. Only a
    process that ``serve``s gets ``port``; the others run without a server."""
    mon = Monitor(port=port if serve else None, **monitor_kwargs)
    try:
        paths = {id(m): n for n, m in model.named_modules() if n}
        for layer in layers:
            if isinstance(layer, str):
                try:
                    module = model.get_submodule(layer)
                except AttributeError:
                    raise ValueError(
                        f"no submodule {layer!r} in {type(model).__name__}; modules: "
                        f"{[n for n, _ in model.named_modules() if n][:20]}") from None
                mon.watch(module, name=layer)
            else:
                mon.watch(layer, name=paths.get(id(layer)))
        if activations:
            mon.watch_activations(model, None if activations is True else list(activations))
    except Exception:
        mon.close()
        raise
    return mon


def publish_pending(mon: Monitor | None) -> Snapshot | None:
    """Publish the steps counted since the monitor's latest publish (the end of training's
    partial cadence), so that the last values reach the framework's loggers before they close;
    None when nothing is pending or the monitor is closed. Errors are counted, not raised
    (unless the monitor is strict)."""
    if mon is None or mon._closed or mon.step_count <= 0:
        return None
    latest = mon.latest
    if latest is not None and latest.step >= mon.step_count:
        return None
    with mon.errors.guard("publish"):
        return mon.publish()
    return None
