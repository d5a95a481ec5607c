"""Engine: per-stream scorer groups, updated on the device, computed at publish with one sync."""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from monitor.config import DEFAULT_MAX_CLASSES
from monitor.engine.tracking import RunTracker
from monitor.errors import ErrorLog
from monitor.scorers import CollapseScorer, SpectrumScorer
from monitor.scorers.sketch import SpectralPath
from monitor.scorers.sketch_spectrum import spectrum_scorer_for
from monitor.snapshot import Histogram, Readings
from monitor.validation import check_int, check_name


class HistogramPart(enum.Enum):
    """The parts of a histogram that a compute moves to the host."""

    BOUNDS = "bounds"
    CUMULATIVE = "cumulative"
    SUM = "sum"
    COUNT = "count"


@dataclass(frozen=True)
class HistogramKey:
    """A compute key holding one part of histogram ``name`` (not a signal)."""

    name: str
    part: HistogramPart


Key = str | HistogramKey
"""A key of :meth:`Stream.compute`: a signal, or a part of a histogram."""


class Entry(NamedTuple):
    """One device tensor of a compute: ``value`` of ``signal`` for ``key`` of ``group``
    (``stream``, ``layer``, ``param`` or ``run``)."""

    group: str
    key: str
    signal: Key
    value: Tensor


class Stream:
    """One stream of rows: the shared window state and the scorers that read it.

    Optional scorers join when first needed: Q-Score (``qscore=True``), neural collapse (the
    first batch with labels), and the generator/real pair statistics (:meth:`Engine.pair`).
    At compute an optional part that fails (Q-Score, neural collapse, or NC3/NC4 against a
    classifier that does not fit) is counted and switched off alone (``parts_off``); the
    spectral and collapse signals go on.
    """

    def __init__(self, name: str, dim: int, window: int, device: torch.device,
                 spectrum: dict[str, Any] | None = None, qscore: dict[str, Any] | None = None,
                 spectral: SpectralPath | None = None) -> None:
        self.name = name
        self.dim = dim
        self.window = window
        # exact d×d window or, for large d, a Gaussian sketch (monitor/scorers/sketch.py)
        self.moments = (spectral or SpectralPath()).make(name, dim, window, device)
        self.scorers: list[SpectrumScorer | CollapseScorer] = [
            spectrum_scorer_for(self.moments, **(spectrum or {})), CollapseScorer()]
        self.qscore: Any = None
        if qscore is not None:
            from monitor.scorers.qscore import QScoreScorer
            options = {"min_calibration_samples": min(256, window), **qscore}
            self.qscore = QScoreScorer(window=window, device=device, **options)
        self.nc: Any = None
        self.enabled = True
        self.parts_off: set[str] = set()
        """Optional parts switched off after a failure: ``qscore``, ``nc``, ``nc_classifier``."""

    @property
    def device(self) -> torch.device:
        return self.moments.device

    def update(self, rows: Tensor, row_index: Tensor | None = None, labels: Tensor | None = None,
               predictions: Tensor | None = None, max_classes: int = 1000) -> None:
        """Accumulate a ``(b, d)`` batch (device work only); ``labels``/``predictions`` are
        already aligned with ``rows``."""
        self.moments.update(rows)
        if self.qscore is not None:
            with_eval = predictions is not None
            self.qscore.update(rows, labels=labels if with_eval else None,
                               predictions=predictions, row_index=row_index)
        if labels is not None:
            self.update_labels(rows, labels, max_classes)

    def update_labels(self, rows: Tensor, labels: Tensor, max_classes: int = 1000) -> None:
        """Feed labelled rows to the neural-collapse scorer (created on first use)."""
        if self.nc is None:
            from monitor.scorers.neural_collapse import NeuralCollapseScorer
            self.nc = NeuralCollapseScorer(self.dim, max_classes, self.window, self.device)
        self.nc.update(rows, labels)

    def compute(self, classifier: tuple[Tensor, Tensor | None] | None = None,
                calibrate: bool = True, errors: ErrorLog | None = None) -> dict[Key, Tensor]:
        """Every scorer's signals as device tensors, the stream's counters and the parts of its
        histograms; ``calibrate``: whether reference levels (the Q-Score threshold) may be
        fixed now. With ``errors``, a failing optional part (Q-Score, neural collapse, NC3/NC4)
        is counted there and switched off alone; without, it raises."""
        out: dict[Key, Tensor] = {}
        for scorer in self.scorers:
            out.update(scorer.compute(self.moments))
        if "spectral_sketch_dim" not in out:                    # the exact path
            out["spectral_sketch_dim"] = torch.zeros((), dtype=torch.float64, device=self.device)
        if self.qscore is not None:
            self._part("qscore", errors, out, lambda: self._qscore_signals(calibrate))
        if self.nc is not None:
            stats: list[tuple[Tensor, Tensor, Tensor]] = []

            def window_signals() -> dict[str, Tensor]:
                stats.append(self.nc.statistics())
                return self.nc.window_signals(stats[0])

            self._part("nc", errors, out, window_signals)
            if classifier is not None and stats:
                self._part("nc_classifier", errors, out, lambda: self.nc.classifier_signals(
                    classifier[0], classifier[1], stats[0]))
        out["samples"] = self.moments.seen
        out["nonfinite_values"] = self.moments.nonfinite
        return out

    def _qscore_signals(self, calibrate: bool) -> dict[Key, Tensor]:
        out: dict[Key, Tensor] = dict(self.qscore.compute(calibrate=calibrate))
        out["negative_values_ratio"] = self._negative_share()
        parts = (HistogramPart.BOUNDS, HistogramPart.CUMULATIVE, HistogramPart.SUM,
                 HistogramPart.COUNT)
        for part, value in zip(parts, self.qscore.histogram(), strict=True):
            out[HistogramKey("qscore", part)] = value
        return out

    def _part(self, part: str, errors: ErrorLog | None, out: dict[Key, Tensor],
              make: Callable[[], Mapping[Any, Tensor]]) -> None:
        """Add the signals of optional ``part``; with ``errors``, a failure is counted (under
        ``qscore`` or ``neural_collapse``) and switches this part off, not the stream."""
        if part in self.parts_off:
            return
        if errors is None:
            out.update(make())
            return
        try:
            values = make()
        except Exception as exc:
            component = "qscore" if part == "qscore" else "neural_collapse"
            errors.record(component, exc, key=f"{part}[{self.name}]")
            self.parts_off.add(part)
            return
        out.update(values)

    def _negative_share(self) -> Tensor:
        """Fraction of negative entries among the window's valid rows: Q-Score assumes
        non-negative (post-ReLU) features (docs/metrics.md §4 pitfall 2)."""
        m = self.moments
        valid = m.ring_valid > 0                                           # (window,)
        neg = m.negative_count()                                           # ()
        total = valid.sum().to(torch.float64) * self.dim
        return torch.where(total > 0, neg / total.clamp_min(1.0),
                           torch.full_like(total, math.nan))


class Layer:
    """One watched activation layer: per-unit dormancy statistics and a window of unit rows
    (conv: channel means per sample) whose spectrum gives the layer's feature rank."""

    def __init__(self, name: str, units: int, window: int, device: torch.device,
                 taus: Sequence[float], low_activity_rate: float,
                 spectral: SpectralPath | None = None) -> None:
        from monitor.scorers.activations import ActivationScorer

        self.name = name
        self.units = units
        self.activations = ActivationScorer(units, taus=tuple(taus),
                                            low_activity_rate=low_activity_rate, device=device)
        self.moments = (spectral or SpectralPath()).make(name, units, window, device)
        self.spectrum = spectrum_scorer_for(self.moments)
        self.enabled = True

    @property
    def device(self) -> torch.device:
        return self.moments.device

    def update(self, h: Tensor, rows: Tensor) -> None:
        """``h``: the raw activations; ``rows``: their (subsampled) per-sample unit rows."""
        self.activations.update(h)
        self.moments.update(rows)

    def compute(self) -> dict[str, Tensor]:
        out = dict(self.activations.compute())
        spec = self.spectrum.compute(self.moments)
        for key in ("effective_rank", "srank", "window_samples"):
            out[key] = spec[key]
        return out


COUNTER_SIGNALS: tuple[str, ...] = ("samples", "nonfinite_values")


class Engine:
    """Owns the streams and layers; creates one lazily on its first batch (d from that batch).

    :meth:`compute` gathers every device tensor of every stream, layer and parameter and moves
    them to the host in one transfer per device: the one synchronisation of a publish.
    """

    def __init__(self, window: int, errors: ErrorLog, spectrum: dict[str, Any] | None = None,
                 spectrum_points: int = 1024, peak_warmup: int = 0,
                 qscore: dict[str, Any] | None = None, max_classes: int | None = 1000,
                 taus: Sequence[float] = (0.0, 0.025, 0.1), low_activity_rate: float = 0.01,
                 spectral: SpectralPath | None = None) -> None:
        self.window = window
        self.spectral = spectral or SpectralPath()
        self.peak_warmup = peak_warmup
        self.errors = errors
        self.spectrum_kwargs = spectrum or {}
        self.qscore_kwargs = qscore
        self.max_classes = DEFAULT_MAX_CLASSES if max_classes is None else max_classes
        """Label capacity of neural collapse; with ``max_classes=None`` it follows the watched
        classifiers (:meth:`watch_classifier`)."""
        self.classes_follow_classifiers = max_classes is None
        self.classifier_classes: dict[str | int, int] = {}
        """out_features of each watched classifier, by stream name or dimension."""
        self.taus = tuple(taus)
        self.low_activity_rate = low_activity_rate
        self.spectrum_points = spectrum_points
        self.streams: dict[str, Stream] = {}
        self.layers: dict[str, Layer] = {}
        self.tracker = RunTracker(window, peak_warmup)
        self.classifiers: dict[str, Callable[[], tuple[Tensor, Tensor | None]]] = {}
        """Classifiers of one stream, by stream name."""
        self.classifiers_by_dim: dict[int, Callable[[], tuple[Tensor, Tensor | None]]] = {}
        """Classifiers of every labelled stream of a dimension, by that dimension."""
        self.pairs: dict[str, tuple[str, Any]] = {}
        self.param_sources: list[Callable[[], dict[str, dict[str, Tensor]]]] = []
        self.run_sources: list[Callable[[], dict[str, Tensor | float]]] = []

    @classmethod
    def from_config(cls, cfg: Any, errors: ErrorLog) -> Engine:
        """The engine of a :class:`~monitor.config.MonitorConfig`."""
        paths = (dict(cfg.spectral_path) if isinstance(cfg.spectral_path, Mapping)
                 else {"*": cfg.spectral_path})
        spectral = SpectralPath(paths.pop("*", "auto"), sketch_above=cfg.sketch_above,
                                sketch_dim=cfg.sketch_dim, seed=cfg.seed, streams=paths,
                                memory_limit_bytes=cfg.memory_limit_bytes)
        return cls(cfg.window, errors, {"alpha_centered": cfg.alpha_centered},
                   peak_warmup=cfg.peak_warmup, qscore=cfg.qscore_options,
                   max_classes=cfg.max_classes, taus=cfg.dormant_taus, spectral=spectral)

    # ------------------------------------------------------------------ updates

    def _stream(self, name: str, rows: Tensor) -> Stream:
        stream = self.streams.get(name)
        if stream is None:
            stream = Stream(name, rows.shape[1], self.window, rows.device, self.spectrum_kwargs,
                            self.qscore_kwargs, self.spectral)
            self.streams[name] = stream
        if rows.shape[1] != stream.dim:
            raise ValueError(f"stream {name!r} has dimension {stream.dim}; got rows of "
                             f"dimension {rows.shape[1]} (use another stream name for another layer)")
        return stream

    def update(self, name: str, rows: Tensor, row_index: Tensor | None = None,
               labels: Tensor | None = None, predictions: Tensor | None = None) -> None:
        """Feed rows ``(b, d)`` to stream ``name``; a new stream takes d and device from them."""
        stream = self._stream(name, rows)
        if not stream.enabled:
            return
        stream.update(rows, row_index, labels, predictions, self.max_classes)
        for fake, (real, scorer) in list(self.pairs.items()):
            if name not in (fake, real) or scorer is None:
                continue
            try:
                if isinstance(scorer, dict):             # first batch of the pair: build it
                    from monitor.scorers.generative import PairScorer
                    scorer = PairScorer(rows.shape[1], device=rows.device, **scorer)
                    self.pairs[fake] = (real, scorer)
                if name == fake:
                    scorer.update_fake(rows)
                else:
                    scorer.update_real(rows)
            except Exception as exc:                     # the pair fails alone; streams go on
                self.errors.record("pair", exc, key=f"pair[{fake}]")
                self.pairs[fake] = (real, None)

    def update_labels(self, name: str, rows: Tensor, labels: Tensor) -> None:
        """Labels that arrive after the rows (``Monitor.step(labels=)``)."""
        stream = self._stream(name, rows)
        if stream.enabled:
            stream.update_labels(rows, labels, self.max_classes)

    def update_layer(self, name: str, h: Tensor, rows: Tensor) -> None:
        """Feed a layer's raw activations ``h`` and their per-sample unit rows."""
        layer = self.layers.get(name)
        if layer is None:
            layer = Layer(name, rows.shape[1], self.window, rows.device, self.taus,
                          self.low_activity_rate, self.spectral)
            self.layers[name] = layer
        if rows.shape[1] != layer.units:
            raise ValueError(f"layer {name!r} has {layer.units} units; got {rows.shape[1]}")
        if layer.enabled:
            layer.update(h, rows)

    def pair(self, fake: str, real: str, *, reservoir: int = 512, dup_quantile: float = 0.01,
             seed: int = 0) -> None:
        """Compare generated stream ``fake`` with reference stream ``real``."""
        check_name("stream name", fake)
        check_name("stream name", real)
        if fake == real:
            raise ValueError("pair() needs two different streams")
        check_int("reservoir", reservoir, 4)
        if not 0.0 < dup_quantile < 1.0:
            raise ValueError(f"dup_quantile must be in (0, 1), got {dup_quantile}")
        kwargs = {"reservoir": reservoir, "dup_quantile": dup_quantile, "seed": seed}
        current = self.pairs.get(fake)
        if current is not None and current[0] == real and not isinstance(current[1], dict):
            return                              # already running (e.g. restored from a checkpoint)
        self.pairs[fake] = (real, kwargs)  # scorer built on the first batch of the pair (needs d)

    def watch_classifier(self, linear: Any, stream: str | None = None) -> None:
        """Read NC3/NC4's class weights and bias from ``linear`` at each publish, for
        ``stream`` (default: every labelled stream of dimension ``linear.in_features``).

        Unless ``max_classes`` was given, the label capacity becomes the largest
        ``out_features`` of the watched classifiers (at least 2), and the existing
        neural-collapse scorers are resized to it."""
        def get() -> tuple[Tensor, Tensor | None]:
            bias = linear.bias.detach() if linear.bias is not None else None
            return linear.weight.detach(), bias

        key: str | int
        if not stream:
            key = int(linear.in_features)
            self.classifiers_by_dim[key] = get
        else:
            key = stream
            self.classifiers[stream] = get
        self.classifier_classes[key] = int(linear.out_features)
        if self.classes_follow_classifiers:
            classes = max(2, *self.classifier_classes.values())
            if classes != self.max_classes:
                self.max_classes = classes
                for st in self.streams.values():
                    if st.nc is not None:
                        st.nc.resize(classes)

    def sample_scores(self, stream: str) -> tuple[Tensor, Tensor]:
        """Q-Scores of the last batch of ``stream`` and the rows' indices in it (host copies)."""
        st = self.streams.get(stream)
        if st is None:
            raise KeyError(f"no stream {stream!r}; streams: {sorted(self.streams)}")
        if st.qscore is None:
            raise RuntimeError("Q-Score is off for this monitor (Monitor(qscore=False))")
        scores, index = st.qscore.sample_scores()
        return scores.cpu(), index.cpu()  # sync: a user call, off the hot path

    # ------------------------------------------------------------------ compute

    def compute(self, step: int | None = None) -> Readings:
        """Compute everything; one device→host transfer per device (the publish sync)."""
        entries: list[Entry] = []
        warm = step is None or step >= self.peak_warmup
        for name, stream in self.streams.items():
            if stream.enabled:
                self._guard("scorer", name, stream, lambda s=stream, n=name: [
                    Entry("stream", n, k, v)
                    for k, v in s.compute(self._classifier(n), calibrate=warm,
                                          errors=self.errors).items()],
                    entries)
        for fake, (_, scorer) in self.pairs.items():
            if scorer is not None and not isinstance(scorer, dict):
                self._guard("pair", fake, None, lambda sc=scorer, f=fake: [
                    Entry("stream", f, k, v) for k, v in sc.compute().items()], entries)
        for name, layer in self.layers.items():
            if layer.enabled:
                self._guard("activations", name, layer, lambda ly=layer, n=name: [
                    Entry("layer", n, k, v) for k, v in ly.compute().items()], entries)
        for source in self.param_sources:
            self._guard("params", "params", None, lambda src=source: [
                Entry("param", p, k, v) for p, vals in src().items() for k, v in vals.items()],
                entries)
        result = Readings()
        host_run: list[tuple[str, float]] = []
        for source in self.run_sources:
            def run_entries(src: Callable[[], dict[str, Tensor | float]] = source) -> list[Entry]:
                out = []
                for k, v in src().items():
                    if isinstance(v, Tensor):
                        out.append(Entry("run", "", k, v))
                    else:
                        host_run.append((k, float(v)))
                return out
            self._guard("run_signals", "run", None, run_entries, entries)
        self._transfer(entries, result)
        result.run_signals.update(host_run)
        for fake, (real, _) in self.pairs.items():
            f, r = result.streams.get(fake, {}), result.streams.get(real, {})
            if fake in result.streams and "effective_rank" in f and "effective_rank" in r:
                fr, rr = f["effective_rank"], r["effective_rank"]
                f["generator_effective_rank_ratio"] = fr / rr if rr > 0 else math.nan
        return result

    def _guard(self, component: str, key: str, owner: Any, make: Callable[[], list[Entry]],
               entries: list[Entry]) -> None:
        try:
            entries.extend(make())
        except Exception as exc:
            self.errors.record(component, exc, key=f"{component}[{key}]")
            if owner is not None:
                owner.enabled = False

    def _transfer(self, entries: list[Entry], result: Readings) -> None:
        per_device: dict[torch.device, list[Entry]] = {}
        for entry in entries:
            per_device.setdefault(entry.value.device, []).append(entry)
        hist_parts: dict[tuple[str, str], dict[HistogramPart, list[float]]] = {}
        for items in per_device.values():
            flat: list[Tensor] = []
            for _, _, signal, value in items:
                if signal == "spectrum":
                    value = value[: self.spectrum_points]
                flat.append(value.detach().reshape(-1).to(torch.float64))
            host = torch.cat(flat).cpu().tolist()  # sync: the one host transfer of a publish
            i = 0
            for (group, key, signal, _), v in zip(items, flat, strict=True):
                chunk = host[i:i + v.numel()]
                i += v.numel()
                if isinstance(signal, HistogramKey):
                    hist_parts.setdefault((signal.name, key), {})[signal.part] = chunk
                elif group == "stream" and signal == "spectrum":
                    result.spectra[key] = chunk
                elif group == "stream" and signal in COUNTER_SIGNALS:
                    result.counters.setdefault(key, {})[signal] = chunk[0]
                elif group == "stream":
                    result.streams.setdefault(key, {})[signal] = chunk[0]
                elif group == "layer":
                    result.layers.setdefault(key, {})[signal] = chunk[0]
                elif group == "param":
                    result.params.setdefault(key, {})[signal] = chunk[0]
                elif group == "run":
                    result.run_signals[signal] = chunk[0]
        for (name, key), parts in hist_parts.items():
            bounds = parts.get(HistogramPart.BOUNDS, [])
            cumulative = parts.get(HistogramPart.CUMULATIVE, [])
            result.histograms.setdefault(name, {})[key] = Histogram(
                bounds=[*bounds, math.inf][: len(cumulative)], cumulative=cumulative,
                sum=parts.get(HistogramPart.SUM, [math.nan])[0],
                count=parts.get(HistogramPart.COUNT, [math.nan])[0])

    def _classifier(self, name: str) -> tuple[Tensor, Tensor | None] | None:
        """The classifier for stream ``name``: its own, or one matching its dimension."""
        get = self.classifiers.get(name)
        if get is None:
            get = self.classifiers_by_dim.get(self.streams[name].dim)
        return get() if get is not None else None

    def after_publish(self) -> None:
        """Start a new publish interval for interval-based scorers (dormancy)."""
        for layer in self.layers.values():
            layer.activations.reset_interval()

    # ------------------------------------------------------------------ state

    def state_dict(self, compact: bool = False) -> dict[str, Any]:
        """Checkpointable state of every stream (windows), and the run's peaks and lows.
        ``compact``: the windows' sufficient statistics without their rings of rows
        (:meth:`monitor.Monitor.state_dict`)."""
        streams: dict[str, Any] = {}
        for name, st in self.streams.items():
            entry: dict[str, Any] = {"dim": st.dim, "enabled": st.enabled, "device": str(st.device),
                                     "moments": st.moments.state_dict(compact)}
            if st.qscore is not None:
                entry["qscore"] = st.qscore.state_dict(compact)
            if st.nc is not None:
                classifier = None
                if compact:                          # the saved rows keep their NC4
                    try:
                        classifier = self._classifier(name)
                    except Exception:  # noqa: BLE001 - NC4 of the saved rows is then unknown
                        classifier = None
                entry["nc"] = st.nc.state_dict(compact, classifier)
            streams[name] = entry
        layers = {name: {"units": ly.units, "enabled": ly.enabled, "device": str(ly.device),
                         "moments": ly.moments.state_dict(compact),
                         "activations": ly.activations.state_dict()}
                  for name, ly in self.layers.items()}
        pairs = {fake: {"real": real, "dim": sc.dim, "device": str(sc.device),
                        "options": {"reservoir": sc.reservoir, "dup_quantile": sc.dup_quantile},
                        "state": sc.state_dict()}
                 for fake, (real, sc) in self.pairs.items()
                 if sc is not None and not isinstance(sc, dict)}
        return {"window": self.window, **self.tracker.state_dict(), "compact": compact,
                "streams": streams, "layers": layers, "pairs": pairs}

    def load_state_dict(self, state: dict[str, Any],
                        device_map: Callable[[str], torch.device] | None = None) -> None:
        """Restore streams saved by :meth:`state_dict`, full or compact (same window size)."""
        if int(state["window"]) != self.window:
            kind = "compact checkpoint" if state.get("compact") else "checkpoint"
            raise ValueError(f"{kind} window is {state['window']} rows, this monitor's is "
                             f"{self.window} (a window's state loads only into the same window)")
        self.streams.clear()
        self.tracker.load_state_dict(state)
        for name, st in state["streams"].items():
            device = device_map(st["device"]) if device_map else torch.device(st["device"])
            stream = Stream(name, int(st["dim"]), self.window, device, self.spectrum_kwargs,
                            self.qscore_kwargs, self.spectral.for_checkpoint(st["moments"]))
            stream.moments.load_state_dict(st["moments"])
            if "qscore" in st and stream.qscore is not None:
                stream.qscore.load_state_dict(st["qscore"])
            if "nc" in st:
                from monitor.scorers.neural_collapse import NeuralCollapseScorer
                stream.nc = NeuralCollapseScorer(stream.dim, self.max_classes, self.window, device)
                stream.nc.load_state_dict(st["nc"])
                stream.nc.resize(self.max_classes)     # labels saved under a larger capacity
            stream.enabled = bool(st["enabled"])
            self.streams[name] = stream
        for fake, st in state.get("pairs", {}).items():
            from monitor.scorers.generative import PairScorer
            device = device_map(st["device"]) if device_map else torch.device(st["device"])
            scorer = PairScorer(int(st["dim"]), device=device, **st["options"])
            scorer.load_state_dict(st["state"])
            self.pairs[fake] = (str(st["real"]), scorer)
        self.layers.clear()
        for name, st in state.get("layers", {}).items():
            device = device_map(st["device"]) if device_map else torch.device(st["device"])
            layer = Layer(name, int(st["units"]), self.window, device, self.taus,
                          self.low_activity_rate, self.spectral.for_checkpoint(st["moments"]))
            layer.moments.load_state_dict(st["moments"])
            layer.activations.load_state_dict(st["activations"])
            layer.enabled = bool(st["enabled"])
            self.layers[name] = layer
