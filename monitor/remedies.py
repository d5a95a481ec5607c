"""Remedies a training loop can apply when repwatch raises an alert.

:func:`recycle_dormant` is ReDo (Sokar, Evci, Lee, Castro & Mnih, ICML 2023, "The Dormant Neuron
Phenomenon in Deep Reinforcement Learning", Alg. 1; reference google/dopamine
``dopamine/labs/redo/weight_recyclers.py``, commit 1dd1661d): every τ-dormant unit of a hidden
layer gets fresh incoming weights and a zero bias, its outgoing weights in the next layer are set
to zero (so the network function is unchanged at the moment of recycling, up to the unit's own,
tiny, contribution) and the optimizer state of exactly those weights is reset.

It runs rarely (at an alert or every F steps), outside the hot path: it synchronises the device
once, to count the recycled units.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from monitor.functional.plasticity import dormant_scores

__all__ = ["recycle_dormant", "layer_pairs"]

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
LayerRef = nn.Module | str


def _name_of(model: nn.Module) -> dict[nn.Module, str]:
    return {m: name for name, m in model.named_modules()}


def layer_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """Default pairing: consecutive Linear/Conv layers in module registration order.

    ``[(l0, l1), (l1, l2), …]`` for layers ``l0, l1, …`` as ``model.named_modules()`` lists them;
    the last layer (the output layer) is only ever a *next* layer, so its units are never
    recycled. This matches an ``nn.Sequential`` MLP/CNN (Linear → act → Linear …). For models
    whose registration order is not the data-flow order, pass ``pairs`` explicitly.
    """
    names = [name for name, m in model.named_modules() if isinstance(m, _LAYERS)]
    return list(zip(names[:-1], names[1:]))


def _resolve(model: nn.Module, ref: LayerRef) -> tuple[str, nn.Module]:
    if isinstance(ref, str):
        try:
            module = model.get_submodule(ref)
        except AttributeError as exc:
            raise ValueError(f"no submodule named {ref!r} in the model") from exc
        return ref, module
    names = _name_of(model)
    if ref not in names:
        raise ValueError(f"layer {type(ref).__name__} is not a submodule of the model")
    return names[ref], ref


def _group_size(layer: nn.Module, nxt: nn.Module) -> int:
    """How many input features of ``nxt`` read one unit of ``layer`` (>1: conv → flatten → Linear)."""
    units = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    fan = nxt.in_features if isinstance(nxt, nn.Linear) else nxt.in_channels
    if isinstance(nxt, nn.Linear) and isinstance(layer, nn.Linear) and fan != units:
        raise ValueError(f"cannot pair Linear({units} outputs) with Linear({fan} inputs)")
    if fan % units != 0 or (not isinstance(nxt, nn.Linear) and fan != units):
        raise ValueError(f"cannot pair a layer with {units} units with a next layer reading {fan} "
                         "features; pass pairs= explicitly")
    if not isinstance(nxt, nn.Linear) and getattr(nxt, "groups", 1) != 1:
        raise ValueError("grouped convolutions are not supported as the next layer")
    if not isinstance(layer, nn.Linear) and getattr(layer, "groups", 1) != 1:
        raise ValueError("grouped convolutions are not supported")
    return fan // units


def _scores_from_inputs(model: nn.Module, pairs: list[tuple[str, nn.Module, str, nn.Module]],
                        inputs: object) -> dict[str, Tensor]:
    """τ-dormant scores per layer from one forward pass, read at each *next* layer's input.

    The input of the next layer is the post-activation output of the layer (Linear → ReLU →
    Linear), which is what Sokar et al. score. Conv → flatten → Linear inputs are regrouped per
    channel.
    """
    captured: dict[str, Tensor] = {}
    handles = []
    for name, layer, _, nxt in pairs:
        def hook(_m: nn.Module, args: tuple, _name: str = name, _layer: nn.Module = layer,
                 _nxt: nn.Module = nxt) -> None:
            h = args[0].detach()
            k = _group_size(_layer, _nxt)
            if isinstance(_nxt, nn.Linear) and k > 1:      # (b, C·k) → (b, C, k, 1): unit = channel
                h = h.reshape(h.shape[0], -1, k, 1)       # 4-D: conv layout, unit axis 1
            captured[_name] = dormant_scores(h)
        handles.append(nxt.register_forward_pre_hook(hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            if isinstance(inputs, (tuple, list)):
                model(*inputs)
            elif isinstance(inputs, Mapping):
                model(**inputs)
            else:
                model(inputs)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    missing = [name for name, *_ in pairs if name not in captured]
    if missing:
        raise ValueError(f"the forward pass on inputs did not reach the next layer of {missing}")
    return captured


def _fresh_weight(w: Tensor, init: str, generator: torch.Generator | None) -> Tensor:
    """A new weight tensor like ``w``: PyTorch's default Linear/Conv init or Xavier uniform."""
    fan_out = w.shape[0] * (w[0, 0].numel() if w.dim() > 2 else 1)
    fan_in = w[0].numel()
    if init == "default":          # kaiming_uniform_(a=√5) of reset_parameters: U(±1/√fan_in)
        bound = 1.0 / math.sqrt(fan_in)
    else:                          # xavier_uniform_, as dopamine's recycler
        bound = math.sqrt(6.0 / (fan_in + fan_out))
    fresh = torch.empty(w.shape, dtype=w.dtype, device=w.device)
    return fresh.uniform_(-bound, bound, generator=generator)


def _zero_state(optimizer: torch.optim.Optimizer | None, p: Tensor, keep: Tensor) -> None:
    """Zero every per-element optimizer state of ``p`` (Adam moments, momentum) where ``keep`` is False."""
    if optimizer is None or p not in optimizer.state:
        return
    for value in optimizer.state[p].values():
        if isinstance(value, Tensor) and value.shape == p.shape:
            value.copy_(torch.where(keep, value, torch.zeros_like(value)))


def recycle_dormant(model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    tau: float = 0.1, scores: Mapping[str, Tensor] | None = None,
                    inputs: object = None,
                    pairs: Sequence[tuple[LayerRef, LayerRef]] | None = None,
                    init: str = "default",
                    generator: torch.Generator | None = None) -> dict[str, int]:
    """ReDo: re-initialise the τ-dormant units of each hidden layer (Sokar et al. 2023, Alg. 1).

    Args:
        model: the network. Layers are paired ``(layer, next_layer)`` by :func:`layer_pairs`
            (consecutive Linear/Conv layers in registration order) unless ``pairs`` is given, as
            module objects or names. The output layer is never recycled.
        optimizer: its per-element state of the touched weights (Adam/AdamW ``exp_avg``,
            ``exp_avg_sq``, ``max_exp_avg_sq``; SGD ``momentum_buffer``; any state tensor shaped
            like the parameter) is zeroed exactly at the touched rows/columns. ``step`` is kept.
        tau: a unit is dormant iff its score ``s_i = E|h_i| / (mean_k E|h_k| + 1e-9) ≤ tau``.
        scores: per layer name, a float tensor of scores (thresholded at ``tau``) or a bool mask
            of the units to recycle (e.g. ``ActivationScorer.dormant_units(tau)``). Layers that
            are not named are left alone.
        inputs: when ``scores`` is None, a batch (tensor, tuple of args or dict of kwargs) to
            score on: one forward pass in eval mode under ``no_grad``, with temporary pre-hooks
            on each next layer reading the post-activation outputs.
        init: ``"default"`` (PyTorch's Linear/Conv ``reset_parameters`` bound ``1/√fan_in``) or
            ``"xavier"`` (dopamine's recycler).
        generator: RNG for the new weights (default: the global one).

    For each dormant unit ``i`` of ``layer``: ``layer.weight[i] ←`` fresh init,
    ``layer.bias[i] ← 0``; ``next.weight[:, cols(i)] ← 0`` (the columns/in-channels reading
    unit i; conv → flatten → Linear: the channel's block of columns); optimizer state zeroed at
    those entries. Norm layers between the two are left as they are.

    Returns:
        ``{layer name: number of recycled units}`` for every paired layer.
    """
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau >= 0):
        raise ValueError(f"tau must be a finite number >= 0, got {tau!r}")
    if init not in ("default", "xavier"):
        raise ValueError(f"init must be 'default' or 'xavier', got {init!r}")
    if scores is None and inputs is None:
        raise ValueError("recycle_dormant needs scores= (per layer) or inputs= (a batch to score on)")
    raw = layer_pairs(model) if pairs is None else list(pairs)
    resolved: list[tuple[str, nn.Module, str, nn.Module]] = []
    for ref, ref_next in raw:
        name, layer = _resolve(model, ref)
        next_name, nxt = _resolve(model, ref_next)
        for n_, m_ in ((name, layer), (next_name, nxt)):
            if not isinstance(m_, _LAYERS):
                raise ValueError(f"layer {n_!r}: expected Linear or Conv1d/2d/3d, got {type(m_).__name__}")
        _group_size(layer, nxt)
        resolved.append((name, layer, next_name, nxt))
    if scores is None:
        scores = _scores_from_inputs(model, resolved, inputs)

    counts: dict[str, int] = {}
    masks: dict[str, Tensor] = {}
    with torch.no_grad():
        for name, layer, _, nxt in resolved:
            w = layer.weight                                               # (units, fan_in…)
            units = w.shape[0]
            if name not in scores:
                masks[name] = torch.zeros(units, dtype=torch.bool, device=w.device)
                continue
            s = torch.as_tensor(scores[name]).to(w.device)
            if s.shape != (units,):
                raise ValueError(f"scores[{name!r}]: expected shape ({units},), got {tuple(s.shape)}")
            mask = s if s.dtype == torch.bool else s <= tau                # (units,) recycle
            masks[name] = mask
            keep_rows = (~mask).view(-1, *([1] * (w.dim() - 1))).expand_as(w)  # (units, fan…)
            w.copy_(torch.where(keep_rows, w, _fresh_weight(w, init, generator)))
            _zero_state(optimizer, w, keep_rows)
            if layer.bias is not None:
                keep_b = ~mask                                             # (units,)
                layer.bias.copy_(torch.where(keep_b, layer.bias, torch.zeros_like(layer.bias)))
                _zero_state(optimizer, layer.bias, keep_b)
        # Outgoing weights after every incoming reset, so that a recycled unit of the next layer
        # (fresh row) still reads nothing from a recycled unit of this one.
        for name, layer, _, nxt in resolved:
            mask = masks[name]
            k = _group_size(layer, nxt)
            wn = nxt.weight                                                # (out, in, …)
            keep_cols = (~mask).repeat_interleave(k)                       # (in,)
            keep_cols = keep_cols.view(1, -1, *([1] * (wn.dim() - 2))).expand_as(wn)
            wn.copy_(torch.where(keep_cols, wn, torch.zeros_like(wn)))
            _zero_state(optimizer, wn, keep_cols)
        # The one host transfer of the remedy.
        stacked = torch.stack([m.sum() for m in masks.values()]).cpu() if masks else torch.empty(0)
    for (name, *_), c in zip(resolved, stacked.tolist()):
        counts[name] = int(c)
    return counts
