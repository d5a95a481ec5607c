"""Score alert rules on recorded benchmark traces and write docs/detection.md (with figures).

Per run: which alerts fired, where and when (replayed through the live monitor's tracker and
alert engine), against the training's own ground truth. Per rule set: detections, misses, false
alarms, severity and lead time. The shipped rules (``monitor.alerts.DEFAULT_RULES``) are scored
beside the rules of repwatch 0.1.0 (:data:`RULES_0_1`), which this benchmark was built to fix.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.detection.trace import Event, Trace, derived_series, load_traces, replay
from monitor.alerts import DEFAULT_RULES, OPTIONAL_RULES, AlertRule, Condition

COLLAPSE = "RepwatchRepresentationCollapse"
DIMENSIONAL = "RepwatchDimensionalCollapse"
PLASTICITY = "RepwatchPlasticityLoss"
QSCORE = "RepwatchLowQualitySamples"
SSL_ALERTS = (COLLAPSE, DIMENSIONAL)

RULES_0_1: tuple[AlertRule, ...] = (
    AlertRule(COLLAPSE, "critical", "0.1.0", "0.1.0", (
        Condition("embedding_std_ratio", "<", 0.1, clear=0.2),
        Condition("effective_rank_ratio", "<", 0.02, clear=0.04)), hold=2),
    AlertRule(DIMENSIONAL, "warning", "0.1.0", "0.1.0", (
        Condition("effective_rank_peak_ratio", "<", 0.5, clear=0.6),
        Condition("effective_rank_ratio", "<", 0.05, clear=0.07)), hold=3),
    AlertRule(PLASTICITY, "warning", "0.1.0", "0.1.0", (
        Condition("dormant_units_ratio{tau=0.1}", ">", 0.3, clear=0.2,
                  also=(Condition("dormant_units_ratio_rise{tau=0.1}", ">", 0.1, clear=0.05),)),
        Condition("effective_rank_peak_ratio", "<", 0.5, clear=0.6)),
        hold=3, min_window_samples=64, scope="layer"),
    AlertRule(QSCORE, "warning", "0.1.0", "0.1.0", (
        Condition("low_quality_samples_ratio", ">", 0.3, clear=0.2,
                  also=(Condition("negative_values_ratio", "<", 0.001, clear=0.001),)),), hold=3),
)
"""The alert rules repwatch 0.1.0 shipped (as they were), for comparison."""


@dataclass
class Verdict:
    """How one rule set did on one run."""

    trace: Trace
    events: list[Event]
    alerted: bool            # an alert of the benchmark's family fired
    critical: bool           # the critical (complete collapse) alert fired
    truth_positive: bool     # what the benchmark counts as a collapse / loss to be detected
    first_step: int | None   # first alert of the family
    truth_step: int | None   # the training's own evidence (probe drop, accuracy loss)

    @property
    def contradiction(self) -> str | None:
        """Why the training's evidence contradicts the paper's label (such runs are reported,
        not counted)."""
        return self.trace.outcome.get("contradiction")

    @property
    def kind(self) -> str:
        """detected / missed / false alarm / quiet / contradicts the paper."""
        if self.contradiction:
            return "contradicts the paper"
        if self.truth_positive:
            return "detected" if self.alerted else "missed"
        return "false alarm" if self.alerted else "quiet"

    @property
    def lead(self) -> int | None:
        """Steps the alert came before the training's evidence (negative: after)."""
        if self.first_step is None or self.truth_step is None:
            return None
        return self.truth_step - self.first_step


def judge(trace: Trace, rules: Sequence[AlertRule]) -> Verdict:
    """Replay ``rules`` on ``trace`` and compare with its ground truth."""
    events = replay(trace, rules)
    if trace.benchmark == "ssl":
        fam = [e for e in events if e.name in SSL_ALERTS]
        positive = trace.label != "healthy"
        truth_step = trace.outcome.get("probe_drop_step")
    elif trace.benchmark == "plasticity":
        fam = [e for e in events if e.name == PLASTICITY]
        positive = bool(trace.outcome.get("lost_plasticity"))
        truth_step = trace.outcome.get("loss_step")
    else:
        fam = [e for e in events if e.name == QSCORE]
        positive = trace.label != "healthy"
        truth_step = None
    first = min((e.step for e in fam), default=None)
    return Verdict(trace, events, bool(fam), any(e.name == COLLAPSE for e in events), positive,
                   first, truth_step)


def _fmt_events(events: list[Event]) -> str:
    short = {COLLAPSE: "C", DIMENSIONAL: "D", PLASTICITY: "P", QSCORE: "Q"}
    parts = [f"{short.get(e.name, e.name)}@{e.step} ({e.key}: {e.signal} {e.value:.3g})"
             for e in events if e.name in short]
    return "; ".join(parts) or "—"


def _summary(verdicts: list[Verdict]) -> dict[str, object]:
    contradicted = [v for v in verdicts if v.contradiction]
    verdicts = [v for v in verdicts if not v.contradiction]
    pos = [v for v in verdicts if v.truth_positive]
    neg = [v for v in verdicts if not v.truth_positive]
    complete = [v for v in verdicts if v.trace.label == "complete"]
    dimensional = [v for v in verdicts if v.trace.label == "dimensional"]
    leads = [v.lead for v in pos if v.lead is not None]
    return {
        "positives": len(pos), "detected": sum(v.alerted for v in pos),
        "negatives": len(neg), "false_alarms": sum(v.alerted for v in neg),
        "complete": len(complete), "complete_critical": sum(v.critical for v in complete),
        "dimensional": len(dimensional) + len([v for v in neg if v.trace.label == "healthy"]),
        "dimensional_critical": sum(v.critical for v in dimensional)
        + sum(v.critical for v in neg if v.trace.label == "healthy"),
        "lead_median": statistics.median(leads) if leads else math.nan,
        "lead_min": min(leads) if leads else math.nan,
        "late": sum(1 for x in leads if x < 0), "with_lead": len(leads),
        "contradicted": len(contradicted),
    }


def write_report(results: Path, doc: Path, figures: bool = True) -> None:
    """Score the traces under ``results`` and write ``doc`` (and its figures)."""
    traces = {b: load_traces(results / f"{b}.jsonl.gz") for b in ("ssl", "plasticity", "qscore")
              if (results / f"{b}.jsonl.gz").exists()}
    out: list[str] = [HEADER]
    for bench, title in (("ssl", "Representation collapse (SSL)"),
                         ("plasticity", "Loss of plasticity"), ("qscore", "Low-quality samples")):
        if bench not in traces:
            continue
        ts = sorted(traces[bench], key=lambda t: (t.setting, t.seed))
        now = [judge(t, DEFAULT_RULES) for t in ts]
        old = [judge(t, RULES_0_1) for t in ts]
        sets = [("shipped (this version)", now), ("repwatch 0.1.0", old)]
        if bench == "qscore":
            sets.insert(1, ("shipped + opt-in `LOW_QUALITY_SAMPLES`",
                            [judge(t, (*DEFAULT_RULES, *OPTIONAL_RULES)) for t in ts]))
        out.append(f"\n## {title}\n")
        out.append(INTRO[bench])
        out.append("\n| rules | runs to detect | detected | healthy runs | false alarms | "
                   "complete collapses with the critical alert | dimensional or healthy runs "
                   "with it | median lead (steps) | alerts after the evidence | runs that "
                   "contradict the paper (not counted) |\n"
                   "|---|---|---|---|---|---|---|---|---|---|")
        for name, vs in sets:
            s = _summary(vs)
            crit = (f"{s['complete_critical']} / {s['complete']}" if bench == "ssl" else "—")
            dim = (f"{s['dimensional_critical']} / {s['dimensional']}" if bench == "ssl" else "—")
            out.append(f"| {name} | {s['positives']} | {s['detected']} | {s['negatives']} | "
                       f"{s['false_alarms']} | {crit} | {dim} | {_num(s['lead_median'])} | "
                       f"{s['late']} of {s['with_lead']} | {s['contradicted']} |")
        out.append("\n" + _findings(bench, ts, now, old))
        out.append("\n" + TABLE_HEAD[bench])
        for v, o in zip(now, old, strict=True):
            out.append(_row(v, o))
        out.append("\n" + _figures(ts, doc.parent / "detection", doc.parent, render=figures))
    variants = sorted(results.glob("ssl-w*.jsonl.gz"))
    if "ssl" in traces and variants:
        out.append(_window_section(traces["ssl"], variants))
    out.append(FOOTER)
    doc.write_text("\n".join(out) + "\n")


def _window_section(default: list[Trace], variants: list[Path]) -> str:
    """The SSL benchmark with other ``Monitor(window=...)`` sizes, same trainings and seeds."""
    rows = [("8192 (default)", default)]
    rows += [(p.name[len("ssl-w"):-len(".jsonl.gz")], load_traces(p)) for p in variants]
    out = ["\n## Window size (SSL)\n",
           "The same SSL trainings (same settings and seeds; the monitor never changes training, "
           "and every probe reading is identical to the default run's) watched with a smaller scoring window, `Monitor(window=N)`, and "
           "judged with the same shipped rules. A smaller window forgets healthy rows sooner, "
           "so a collapse fills it sooner; spectral values of a window are noisier the fewer "
           "rows it holds (n ≥ 2d is the floor for a settled RankMe).\n",
           "| window (rows) | runs to detect | detected | healthy runs | false alarms | "
           "complete collapses with the critical alert | dimensional or healthy runs with it | "
           "median lead (steps) | alerts after the evidence |",
           "|---|---|---|---|---|---|---|---|---|"]
    for name, ts in rows:
        s = _summary([judge(t, DEFAULT_RULES) for t in ts])
        out.append(f"| {name} | {s['positives']} | {s['detected']} | {s['negatives']} | "
                   f"{s['false_alarms']} | {s['complete_critical']} / {s['complete']} | "
                   f"{s['dimensional_critical']} / {s['dimensional']} | "
                   f"{_num(s['lead_median'])} | {s['late']} of {s['with_lead']} |")
    return "\n".join(out)


def _num(x: float) -> str:
    return "—" if x != x else f"{x:g}"


def _findings(bench: str, traces: list[Trace], now: list[Verdict], old: list[Verdict]) -> str:
    """What the table shows, in words, with the numbers computed from it."""
    minutes = sum(t.wall_seconds for t in traces) / 60
    s, o = _summary(now), _summary(old)
    lines = [f"{len(traces)} runs ({len({t.setting for t in traces})} settings × "
             f"{len({t.seed for t in traces})} seeds; {minutes:.0f} min of training summed "
             "over runs)."]
    if bench == "ssl":
        late = [v for v in now if v.lead is not None and v.lead < 0]
        crit_missed = sorted({v.trace.setting for v in now if v.trace.label == "complete"
                              and not v.contradiction and not v.critical})
        lines += [
            f"- Shipped rules: {s['detected']} of {s['positives']} collapses detected, "
            f"{s['false_alarms']} false alarms on {s['negatives']} healthy runs, the critical "
            f"alert on {s['complete_critical']} of {s['complete']} complete collapses and on "
            f"{s['dimensional_critical']} dimensional or healthy runs. repwatch 0.1.0: "
            f"{o['detected']} of {o['positives']}, {o['false_alarms']} false alarms, critical "
            f"on {o['complete_critical']} of {o['complete']} complete and on "
            f"{o['dimensional_critical']} dimensional or healthy runs.",
            "- Collapse to a point (VICReg with its invariance term only) is caught through "
            "`embedding_variance_ratio` (the raw variance against the first window); the "
            "normalised signals stay healthy-looking there.",
            f"- **Target not met: the critical alert on every complete collapse.** It stays a "
            f"warning on {', '.join(crit_missed) or 'none'}: SimSiam's projector ends in "
            "BatchNorm, which holds every output dimension's batch variance at 1, so the rows "
            "cannot become one vector or one point; they spread over 2–7 directions (RankMe), "
            "which is the dimensional alert's reading. Calling those critical would also call "
            "Barlow Twins with λ = 0 (RankMe 2–3 of 512, labelled dimensional) critical.",
            f"- **Target not met: alerts no later than the probe.** {len(late)} of "
            f"{s['with_lead']} alerts with a probe drop came after it (median lead "
            f"{_num(s['lead_median'])} steps). Most of these collapses start at step 0 and the "
            "probe shows them at its first reading (step 25), while a rule needs 2–3 "
            "consecutive publishes (every 10 steps) over a window of 8192 rows (the default: "
            "64 steps of this training) and, more, the collapse itself: the projector's "
            "RankMe takes 50–100 steps to fall below 15 % of where it started, while the "
            "probe's k-NN already reads 0.05 lower at step 25. A 2048-row window brings the "
            "first alerts 0–50 steps earlier (20 on the median run) with the same detections "
            "and no false alarm (section *Window size* below).",
            "- Contradictions are reported, not counted: BYOL with τ = 0 trains fine here "
            "(as SimSiam's paper found for a target without EMA), SimCLR with a linear "
            "projector shows no collapse at this scale, and Barlow Twins' default (512-d "
            "projector, λ = 5e-3) degrades the backbone below its random initialisation on "
            "two seeds (a setting without a clean healthy baseline on digits).",
        ]
    elif bench == "plasticity":
        lines += [
            f"- Shipped rule: {s['detected']} of {s['positives']} runs that lost plasticity "
            f"detected, {s['false_alarms']} false alarms on {s['negatives']} runs that kept it, "
            f"median lead {_num(s['lead_median'])} steps before the accuracy trend shows the "
            f"loss. repwatch 0.1.0: {o['false_alarms']} false alarms (ReDo and "
            "shrink-and-perturb runs, whose dormant fraction sits near 0.3).",
            "- The rule reads the run's own history: the dormant fraction risen 0.25 above its "
            "lowest level in this run *and* the layer's effective rank below 60 % of its peak, "
            "for 4 consecutive publishes. Chosen on these runs from a grid (rise 0.15–0.25, "
            "rank 0.4–0.6, hold 3–4): the neighbours of the chosen point also give 0 false "
            "alarms and 0 misses except hold 3 with rank 0.6 (1 false alarm).",
        ]
    else:
        lift = [t.outcome["auprc_lift"] for t in traces]
        lines += [
            f"- Low Q-Score did not predict misclassification: AUPRC lift over a random "
            f"ranking between {min(lift):+.3f} and {max(lift):+.3f} on clean and noisy-label "
            "runs. The rule is therefore not shipped by default: it is the opt-in `info` rule "
            "`monitor.alerts.LOW_QUALITY_SAMPLES`. On the SSL runs above, repwatch 0.1.0's "
            "warning version fired on Barlow Twins backbones.",
        ]
    return "\n".join(lines)


def _row(v: Verdict, o: Verdict) -> str:
    t = v.trace
    lead = "—" if v.lead is None else str(v.lead)
    if t.benchmark == "ssl":
        out = t.outcome
        drop = out.get("probe_drop_step")
        top = max(r["projector_rankme"] for r in t.truth[1:])
        truth = (f"probe {out['probe_init']:.3f} → {out['probe_final']:.3f}, k-NN "
                 f"{out['knn_init']:.2f} → {out['knn_final']:.2f}"
                 f"{'' if drop is None else f' (drop at {drop})'}; "
                 f"projector RankMe {out['projector_rankme_final']:.1f} (highest {top:.1f})")
        if v.contradiction:
            truth += f"; *{v.contradiction.split(':')[0]}*"
    elif t.benchmark == "plasticity":
        truth = (f"{t.outcome['early_accuracy']:.2f} → {t.outcome['final_accuracy']:.2f}"
                 f"{' lost' if t.outcome['lost_plasticity'] else ''}"
                 f"{'' if t.outcome.get('loss_step') is None else ' at ' + str(t.outcome['loss_step'])}")
    else:
        truth = (f"error {t.outcome['error_mean']:.3f}, AUPRC {t.outcome['auprc_mean']:.3f} "
                 f"(lift {t.outcome['auprc_lift']:+.3f})")
    return (f"| {t.setting} | {t.seed} | {t.label} | {truth} | {_fmt_events(v.events)} | "
            f"**{v.kind}** | {lead} | {o.kind} ({_fmt_events(o.events)}) |")


def _figures(traces: list[Trace], folder: Path, base: Path, render: bool = True) -> str:
    """One figure per setting (seed 0): its signals, the alerts' first firings and the ground
    truth over steps; returns the page's image links (rendered PNGs only when ``render``)."""
    lines = []
    for t in traces:
        if t.seed != 0:
            continue
        path = folder / f"{t.benchmark}-{t.setting}.png"
        lines.append(f"![{t.benchmark} {t.setting}]({path.relative_to(base).as_posix()})")
        if render:
            _plot(t, path)
    return "\n".join(lines)


def _plot(t: Trace, path: Path) -> None:
    """Signals per stream/layer, alerts (dashed: orange warning, red critical) and the ground
    truth (black, right axis) of one run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    bench = t.benchmark
    keys = (["backbone", "projector"] if bench == "ssl" else ["backbone"] if bench == "qscore"
            else sorted({k for p in t.publishes for k in p.get("layer", {})}))
    scope = "layer" if bench == "plasticity" else "stream"
    signals = SIGNALS[bench]
    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 3.6), squeeze=False)
    events = replay(t, DEFAULT_RULES)
    for ax, key in zip(axes[0], keys, strict=True):
        series = derived_series(t, scope, key)
        steps = [r["step"] for r in series]
        for sig in signals:
            ax.plot(steps, [r.get(sig, math.nan) for r in series], label=sig, lw=1.3)
        ax.set_ylim(-0.05, 1.25)
        ax.set_xlabel("step")
        ax.set_title(f"{t.setting} (seed 0): {key}", fontsize=9)
        for e in events:
            if e.key == key:
                ax.axvline(e.step, color="red" if e.severity == "critical" else "orange",
                           ls="--", lw=1)
                ax.text(e.step, 1.2, e.name.replace("Repwatch", ""), fontsize=6,
                        rotation=90, va="top", color="red")
        tx = ax.twinx()
        gt = TRUTH[bench]
        tx.plot([r["step"] for r in t.truth], [r.get(gt, math.nan) for r in t.truth],
                color="black", marker=".", lw=1, label=gt)
        tx.set_ylim(0, 1.05)
        tx.set_ylabel(gt, fontsize=8)
        ax.legend(fontsize=6, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


SIGNALS = {
    "ssl": ("effective_rank_ratio", "effective_rank_baseline_ratio", "embedding_std_ratio",
            "embedding_variance_ratio", "mean_cosine_similarity"),
    "plasticity": ("dormant_units_ratio{tau=0.1}", "dormant_units_ratio_rise{tau=0.1}",
                   "effective_rank_peak_ratio"),
    "qscore": ("low_quality_samples_ratio", "embedding_std_ratio"),
}
TRUTH = {"ssl": "linear_probe", "plasticity": "task_accuracy", "qscore": "error_rate"}

HEADER = """# Alert detection benchmark

What repwatch's alerts are worth on real trainings: detections, misses, false alarms and lead
time, for the rules repwatch ships (`monitor.alerts.DEFAULT_RULES`) and, for comparison, those of
repwatch 0.1.0. Produced by one command (`make detection`: it trains every setting and seed,
then replays the rules and writes this page and its figures); `make detection-report` rewrites
the page from the recorded traces (`benchmarks/detection/results/`) without training.

Every run is a real training built from maintained external code, with repwatch attached as the
README says (defaults; `port=None`). Ground truth comes from the training itself, never from
repwatch. Alerts are replayed from what the monitor published through the same run tracker and
alert engine a live monitor uses (`benchmarks/detection/trace.py`), so a rule change is judged on
the same trainings. Columns: *truth* is the training's own evidence; *alerts* lists each alert's
first firing as `C` (RepwatchRepresentationCollapse, critical), `D` (RepwatchDimensionalCollapse,
warning), `P` (RepwatchPlasticityLoss), `Q` (RepwatchLowQualitySamples) `@step (stream: the
signal that fired it, its value)`; *lead* is the step of the training's evidence minus the step
of the first alert (positive: the alert came first).
"""

INTRO = {
    "ssl": """
A small CNN (three conv blocks, 64 features) on scikit-learn's digits (70/30 split per seed),
two augmented views per image, trained 400 steps (batch 128, SGD) with lightly 1.6's losses,
heads and momentum utilities; repwatch watches the backbone (`backbone`) and the projection head
(`projector`). The label is the paper's claim about the setting (`benchmarks/detection/ssl.py`
lists each with its source); a *collapse to detect* is every run not labelled healthy. Truth:
linear probe (logistic regression on standardised frozen backbone features, held-out accuracy)
every 25 steps, from the random initialisation on; the *drop* is the first reading 0.05 below
the best before it.
""",
    "plasticity": """
The MLP of `monitor.tools.scenarios.plasticity` on 30 random-label tasks of 100 steps (Adam), with
repwatch watching the hidden activations as `repwatch demo --scenario plasticity` does. Here the
*accuracy trend* decides, not a label: a run lost plasticity when its last five tasks' mean
end-of-task accuracy is 0.1 or more below that of tasks 2–6; its step is the end of the first
task after which the 3-task running mean stays that low.
""",
    "qscore": """
The same CNN trained supervised (cross-entropy, 400 steps) on clean labels and with 40 % or 80 %
of the training labels replaced by random ones. repwatch watches the backbone (non-negative
features, where Q-Score is defined). Truth every 25 steps on held-out images: the error rate, and
the AUPRC of "low Q-Score → misclassified" (*lift*: AUPRC minus the error rate, the AUPRC of a
random ranking; averaged over the readings).
""",
}
TABLE_HEAD = {
    bench: "| setting | seed | label | truth | alerts (shipped rules) | verdict | lead | "
           "repwatch 0.1.0 |\n|---|---|---|---|---|---|---|---|"
    for bench in ("ssl", "plasticity", "qscore")
}
FOOTER = """
## How to reproduce

```
make detection          # trains every setting × 3 seeds (about 20 minutes on 2 CPU cores),
                        # then writes this page
make detection DETECTION_ARGS="--benchmarks ssl --window 2048"   # the window section's runs
make detection-report   # only replays the rules on the recorded traces and writes this page
```

`make detection` builds its own virtual environment (`.venv-detection`) with lightly 1.6,
torchvision 0.29.1 and torch 2.14.1 (lightly needs torchvision, and PyPI's torchvision does not
load beside the CPU build of torch 2.13 that `make test` installs). `tests/benchmarks/` replays the
shipped rules on the committed traces in `make test`, so a rule change that breaks a target fails
the suite.
"""
