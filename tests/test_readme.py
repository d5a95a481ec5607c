"""The README's examples run as written (issue 19).

Every fenced ```python block of README.md is executed, cut into *snippets* where one block holds
independent examples (the Lightning and the Hugging Face callbacks), against a tiny model and
tiny data; the names a snippet assumes but does not define (``model``, ``loader``, ``y``, ...)
come from a small prelude per snippet (:data:`SNIPPETS`), and a README placeholder such as
``model = ...`` or ``loss = ...`` is given a stand-in from :data:`FILLS`. What the test changes
in the executed text, and only there:

* ``port=9400`` becomes ``port=0`` (any free port): a fixed port may be taken on a machine
  where other tests or a real run serve it;
* the sidecar URL ``http://127.0.0.1:9400`` becomes the URL of a sidecar this test starts
  in-process (a thread, port 0);
* ``NAME = ...`` placeholders call :data:`FILLS`.

After a snippet ran, a few checks read what it should have produced (a signal, a file) and that
no exception was swallowed by repwatch's never-break-training guard (``mon.errors``): an
example that misuses the API fails here although repwatch would only have counted it.

Meta-checks: every python block is covered line for line by snippets or is in :data:`ALLOWED`
(with its reason), and every snippet finds its block, so a new block is not silently ignored;
a fence in a language this test does not know fails. Shell blocks are not executed: their
``repwatch ...`` lines (and the ``repwatch ...`` commands quoted inline in the prose) are parsed
by the real command-line parser (options and arguments exist; nothing runs), their ``make``
targets must exist in the Makefile.

A snippet that raises fails with the README line (number and text) that raised, the original
exception chained.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import math
import re
import shlex
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

PYTHON = ("python", "py")
SHELL = ("bash", "sh", "shell", "console")

# The README's fixed port, and what the executed text uses instead: 0 (any free port), so that
# a port another test or a real run holds cannot fail or cross-talk with this test.
FIXED_PORT = 9400


# ------------------------------------------------------------------ reading the README

@dataclass(frozen=True)
class Block:
    """A fenced code block: its language, its code (dedented) and the README line of its first
    code line (1-based)."""

    lang: str
    code: str
    line: int


def readme_text() -> str:
    return README.read_text(encoding="utf-8")


def readme_blocks(text: str | None = None) -> list[Block]:
    """Every fenced block of README.md, in order (fences indented in list items included)."""
    lines = (readme_text() if text is None else text).splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = re.match(r"^( *)(`{3,}|~{3,})[ \t]*([^\s`]*)", lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.groups()
        close = re.compile(rf"^ *{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        j = i + 1
        while j < len(lines) and not close.match(lines[j]):
            j += 1
        body = [ln[len(indent):] if ln.startswith(indent) else ln for ln in lines[i + 1:j]]
        blocks.append(Block(lang.lower(), textwrap.dedent("\n".join(body)) + "\n", i + 2))
        i = j + 1
    return blocks


def python_blocks() -> list[Block]:
    return [b for b in readme_blocks() if b.lang in PYTHON]


def _strip_fences(text: str) -> str:
    out, inside, fence = [], False, ""
    for ln in text.splitlines():
        m = re.match(r"^ *(`{3,}|~{3,})", ln)
        if m and (not inside or m.group(1)[0] == fence):
            inside, fence = not inside, m.group(1)[0]
            continue
        if not inside:
            out.append(ln)
    return "\n".join(out)


# ------------------------------------------------------------------ snippets and allow-list

@dataclass(frozen=True)
class Snippet:
    """Part of a python block: the block holding ``marker``, from its line containing ``start``
    (None: the first line) up to the line before the one containing ``stop`` (None: the end)."""

    marker: str
    start: str | None = None
    stop: str | None = None

    def block(self, blocks: list[Block]) -> Block:
        found = [b for b in blocks if self.marker in b.code]
        assert len(found) == 1, (f"README.md: {len(found)} python blocks contain {self.marker!r} "
                                 "(expected exactly one): update SNIPPETS in tests/test_readme.py")
        return found[0]

    def span(self, block: Block) -> tuple[int, int]:
        """(first, end) line indices of the snippet in ``block``'s code."""
        lines = block.code.splitlines()

        def index(text: str) -> int:
            hits = [i for i, ln in enumerate(lines) if text in ln]
            assert len(hits) == 1, f"README.md block at line {block.line}: {len(hits)} lines contain {text!r}"
            return hits[0]

        first = 0 if self.start is None else index(self.start)
        end = len(lines) if self.stop is None else index(self.stop)
        assert first < end, f"empty snippet {self}"
        return first, end

    def code(self, blocks: list[Block]) -> tuple[str, int]:
        """The snippet's code and the README line of its first line."""
        block = self.block(blocks)
        first, end = self.span(block)
        return "\n".join(block.code.splitlines()[first:end]) + "\n", block.line + first


SNIPPETS: dict[str, Snippet] = {
    "plain_loop": Snippet("for x in loader:"),
    "more_signals": Snippet("mon.watch_activations(model)"),
    "lightning": Snippet("monitor.integrations.lightning",
                         stop="from monitor.integrations.transformers import"),
    "transformers": Snippet("monitor.integrations.lightning",
                            start="from monitor.integrations.transformers import"),
    "loggers": Snippet("from monitor.loggers import"),
    "history": Snippet("from monitor import history"),
    "sidecar": Snippet('sink="http://127.0.0.1:9400"'),
}

# Python blocks that cannot run here: {marker: reason}. Every block of the README runs today
# (the callbacks on tiny models, the sidecar in a thread); a block that needs a GPU, Kubernetes,
# W&B online or a long training would go here, with its reason.
ALLOWED: dict[str, str] = {}


# ------------------------------------------------------------------ executing a snippet

def _rewrite(code: str, sidecar_url: str | None = None) -> str:
    """The executed text: the fixed port → 0 (any free port), the sidecar URL → ours."""
    if sidecar_url is not None:
        code = code.replace(f"http://127.0.0.1:{FIXED_PORT}", sidecar_url)
    return re.sub(rf"\bport={FIXED_PORT}\b", "port=0", code)


class _Placeholders(ast.NodeTransformer):
    """``NAME = ...`` (the README's "your code here") → ``NAME = __readme_fill__("NAME")``."""

    def visit_Assign(self, node: ast.Assign) -> ast.AST:
        if (len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and isinstance(node.value, ast.Constant) and node.value.value is Ellipsis):
            node.value = ast.Call(ast.Name("__readme_fill__", ast.Load()),
                                  [ast.Constant(node.targets[0].id)], [])
        return node


SNIPPET_FILE = "<README.md>"     # not a path: a failure shows the one README line, not the file


class ReadmeExampleError(Exception):
    """A README example raised (the message names its README line; the cause is chained)."""


def run_snippet(name: str, ns: dict[str, Any], sidecar_url: str | None = None) -> None:
    """Execute snippet ``name`` of the README in namespace ``ns`` (after its prelude)."""
    code, line = SNIPPETS[name].code(python_blocks())
    tree = ast.parse(_rewrite(code, sidecar_url), filename=SNIPPET_FILE)
    ast.increment_lineno(tree, line - 1)        # tracebacks name the README's own lines
    tree = ast.fix_missing_locations(_Placeholders().visit(tree))
    for node in ast.walk(tree):                 # no fixed port left in what runs
        if isinstance(node, ast.Constant) and (
                node.value == FIXED_PORT or (isinstance(node.value, str)
                                             and f":{FIXED_PORT}" in node.value)):
            pytest.fail(f"README.md line {node.lineno}: fixed port {FIXED_PORT} in a snippet "
                        f"the test does not rewrite: extend _rewrite in tests/test_readme.py")

    def fill(placeholder: str) -> Any:
        if placeholder not in FILLS:
            pytest.fail(f"README.md snippet {name!r}: placeholder `{placeholder} = ...` has no "
                        "stand-in: add it to FILLS in tests/test_readme.py")
        return FILLS[placeholder](ns)

    ns.setdefault("__builtins__", __builtins__)
    ns["__readme_fill__"] = fill
    shown = _rewrite(code, sidecar_url).splitlines()
    try:
        exec(compile(tree, SNIPPET_FILE, "exec"), ns)  # noqa: S102 - the README's own examples
    except Exception as exc:
        tb, where = exc.__traceback__, None
        while tb is not None:                    # the innermost README line on the stack
            if tb.tb_frame.f_code.co_filename == SNIPPET_FILE:
                where = tb.tb_lineno
            tb = tb.tb_next
        text = shown[where - line].strip() if where is not None else "?"
        raise ReadmeExampleError(f"README.md:{where}: `{text}` (snippet {name!r}) raised "
                                 f"{type(exc).__name__}: {exc}") from exc


def no_errors(mon: Any) -> None:
    """Nothing was swallowed by repwatch's guard (an example misusing the API would be)."""
    counts = {k: v for k, v in mon.errors.counts().items() if v}
    assert not counts, f"errors caught inside repwatch while running the README: {counts}"


# ------------------------------------------------------------------ tiny model and data

D_IN, D, CLASSES, BATCH = 16, 32, 4, 32


class Net(nn.Module):
    """encoder → projector → fc, registered in data-flow order (what ReDo's default pairing
    of consecutive Linear layers expects; every Linear is on the forward path)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(D_IN, D), nn.ReLU())
        self.projector = nn.Sequential(nn.Linear(D, D), nn.ReLU(), nn.Linear(D, D))
        self.fc = nn.Linear(D, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.projector(self.encoder(x)))


def batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(BATCH, D_IN, generator=gen),
             torch.randint(0, CLASSES, (BATCH,), generator=gen)) for _ in range(n)]


def train_steps(ns: dict[str, Any], steps: int, seed: int = 1) -> None:
    """A few real training steps of ``ns``'s model under ``ns``'s monitor."""
    model, opt, mon = ns["model"], ns["opt"], ns["mon"]
    for xb, yb in batches(steps, seed):
        loss = nn.functional.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        mon.step(labels=yb)


# Stand-ins for the README's placeholders `NAME = ...`, each built from the namespace.
FILLS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "model": lambda ns: Net(),
    "opt": lambda ns: torch.optim.SGD(ns["model"].parameters(), lr=0.05, momentum=0.9),
    # the plain loop's loss: z is the projector's output of batch x (any differentiable loss)
    "loss": lambda ns: nn.functional.mse_loss(ns["z"][:, :D_IN], ns["x"]),
}


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Files the examples write (ckpt.pt, run.jsonl, runs/, lightning_logs/, last.ckpt) land in
    a temporary directory."""
    monkeypatch.chdir(tmp_path)


# ------------------------------------------------------------------ the plain-PyTorch blocks

def _plain_loop(ns: dict[str, Any]) -> None:
    """Block "Use it on a plain PyTorch loop": ``model``/``opt``/``loss`` are placeholders
    (:data:`FILLS`); ``loader`` yields input batches."""
    ns["loader"] = [xb for xb, _ in batches(30)]       # 30 steps: publishes at 10, 20, 30
    torch.manual_seed(0)
    run_snippet("plain_loop", ns)
    mon, snap = ns["mon"], ns["snap"]
    assert mon._closed and mon.step_count == 30
    assert 1.0 < snap.get("effective_rank", stream="encoder") <= D
    assert 1.0 < snap.get("effective_rank", stream="projector") <= D
    assert isinstance(snap.alerts, list)
    ckpt = torch.load("ckpt.pt", weights_only=False)
    assert set(ckpt) == {"model", "repwatch"}
    no_errors(mon)


def test_plain_loop() -> None:
    _plain_loop({})


def test_more_signals() -> None:
    """Block "More signals": continues the plain loop's model and optimizer, on a fresh Monitor
    (the plain-loop block closes its own at the end; the calls belong before its loop)."""
    ns: dict[str, Any] = {}
    _plain_loop(ns)
    from monitor import Monitor

    model = ns["model"]
    mon = ns["mon"] = Monitor(run="exp1", every=10, port=None)
    mon.watch(model.encoder, name="encoder")
    (x, y), = batches(1, seed=2)
    ns.update(x=x, y=y, xb=x, yb=y, x_probe=x, loss_fn=nn.functional.cross_entropy)
    ns["logits"] = model(x)                      # a training forward: the encoder hook captures it
    with mon.paused():                           # features of the same batch, not captured again
        ns["feats"] = model.projector(model.encoder(x)).detach()

    def evaluate(m: nn.Module) -> float:
        m.eval()
        with torch.no_grad():
            acc = (m(x).argmax(1) == y).float().mean().item()
        m.train()
        return acc

    ns["evaluate"] = evaluate
    run_snippet("more_signals", ns)
    scores, rows = ns["scores"], ns["rows"]
    assert scores.shape == rows.shape and scores.numel() > 0
    assert 0.0 <= ns["val"] <= 1.0
    train_steps(ns, 12)                         # the opted-in signals, published
    snap = mon.publish()
    assert math.isfinite(snap.get("neural_collapse_nc1", stream="encoder"))
    assert math.isfinite(snap.get("neural_collapse_nc3", stream="encoder"))   # watch_classifier
    assert math.isfinite(snap.get("qscore_auprc", stream="eval"))
    assert 0.0 <= snap.get("dormant_units_ratio", layer="encoder.1", tau=0.1) <= 1.0
    assert snap.get("weight_norm", param="fc.weight") > 0
    mon.close()
    no_errors(mon)


def test_loggers() -> None:
    """Block "Next to the loss curves": a TensorBoard sink on a live Monitor; its event file
    gets the repwatch scalars (read back with tensorboard's own reader). The alternatives its
    comment names (W&B needs an account online, MLflow a tracking store) are not constructed:
    their keywords are checked against the signatures."""
    import inspect

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from monitor import Monitor
    from monitor.loggers import MLflow, WandB

    inspect.signature(WandB).bind(project="p")          # **init_kwargs, to wandb.init
    inspect.signature(MLflow).bind(experiment="e")

    model = Net()
    ns: dict[str, Any] = {"model": model, "opt": torch.optim.SGD(model.parameters(), lr=0.05),
                          "mon": Monitor(run="exp1", every=2, port=None)}
    ns["mon"].watch(model.encoder, name="encoder")
    run_snippet("loggers", ns)
    train_steps(ns, 4)
    ns["mon"].close()
    no_errors(ns["mon"])
    acc = EventAccumulator("runs/exp1")
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "repwatch/encoder/effective_rank" in tags, tags
    assert [e.step for e in acc.Scalars("repwatch/encoder/effective_rank")] == [2, 4]


def test_history() -> None:
    """Block "History": reads the log a ``Monitor(log_path="run.jsonl")`` wrote (as the prose
    before it says)."""
    pytest.importorskip("pandas", reason="history.to_frame needs pandas (the history extra)")
    from monitor import Monitor

    model = Net()
    ns: dict[str, Any] = {"model": model, "opt": torch.optim.SGD(model.parameters(), lr=0.05)}
    with Monitor(run="exp1", every=2, port=None, log_path="run.jsonl") as mon:
        ns["mon"] = mon
        mon.watch(model.encoder, name="encoder")
        train_steps(ns, 6)
    no_errors(mon)
    run_snippet("history", ns)
    assert [s.step for s in ns["snaps"]] == [2, 4, 6]
    df = ns["df"]
    assert {"run", "step", "scope", "entity", "signal", "value"} <= set(df.columns)
    assert set(df.step) == {2, 4, 6} and set(df.run) == {"exp1"}


def test_sidecar() -> None:
    """Block "Sidecar mode": a sidecar served in-process (a thread, any free port) stands for
    ``repwatch serve``; the README's Monitor ships the watched rows to it."""
    from monitor import Monitor
    from monitor.server import BackgroundServer
    from monitor.sidecar.service import Sidecar, SidecarConfig, create_sidecar_app

    backend = "onnx" if importlib.util.find_spec("onnxruntime") else "torch"
    config = SidecarConfig(backend=backend, every=10, window=2048, device="cpu")
    sidecar = Sidecar(config)
    server = BackgroundServer(create_sidecar_app(config, sidecar), "127.0.0.1", 0)
    server.start()
    try:
        model = Net()
        ns: dict[str, Any] = {"model": model, "Monitor": Monitor,   # imported by the first block
                              "opt": torch.optim.SGD(model.parameters(), lr=0.05)}
        run_snippet("sidecar", ns, sidecar_url=server.url)
        mon = ns["mon"]
        assert mon.url is None                     # with sink=: no server of its own
        train_steps(ns, 10)
        mon.close()
        assert sidecar.wait_idle(30)
        acc = sidecar.accounting()
        assert sum(acc["received"].values()) == 10 * BATCH, acc
        assert sum(acc["scored"].values()) == 10 * BATCH, acc
        no_errors(mon)
    finally:
        server.stop()
        sidecar.close()


# ------------------------------------------------------------------ Lightning / Hugging Face

@pytest.mark.slow                               # a tiny real Lightning training (2 fits)
def test_lightning_callback() -> None:
    """First half of block "Lightning / Hugging Face". ``lightning`` (used, not imported, by
    the README) is given as a namespace whose ``pytorch.Trainer`` is Lightning's Trainer made
    tiny (12 CPU steps, no progress bar) with a callback that writes ``last.ckpt`` at step 6
    (as a ``ModelCheckpoint(save_last=True)`` would have, had the run stopped there): the
    README's second fit resumes there and trains steps 7-12 on the restored Monitor."""
    pl = pytest.importorskip("lightning.pytorch", reason="lightning is not installed")

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.Sequential(nn.Linear(D_IN, D), nn.ReLU())
            self.head = nn.Linear(D, CLASSES)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.encoder(x))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            xb, yb = batch
            return nn.functional.cross_entropy(self(xb), yb)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.05)

    class LastAt(pl.Callback):
        """``last.ckpt`` at step 6 (the end of the first epoch)."""

        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if trainer.global_step == 6 and not Path("last.ckpt").exists():
                trainer.save_checkpoint("last.ckpt")

    def trainer(callbacks: list[Any], **kw: Any) -> Any:
        return pl.Trainer(callbacks=[*callbacks, LastAt()], max_steps=12, accelerator="cpu",
                          devices=1, enable_progress_bar=False, enable_model_summary=False,
                          enable_checkpointing=False, **kw)

    data = batches(6)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.cat([x for x, _ in data]),
                                       torch.cat([y for _, y in data])), batch_size=BATCH)
    pl.seed_everything(0, verbose=False)
    ns: dict[str, Any] = {"model": Module(), "loader": loader,
                          "lightning": SimpleNamespace(pytorch=SimpleNamespace(Trainer=trainer))}
    run_snippet("lightning", ns)
    t = ns["trainer"]
    cb = next(c for c in t.callbacks if type(c).__name__ == "RepwatchCallback")
    mon = cb.monitor
    assert Path("last.ckpt").is_file()
    assert t.global_step == 12 and mon is not None and mon._closed
    assert mon.step_count == 12                  # the resumed fit went on from step 6
    snap = mon.latest
    assert snap is not None and snap.step == 12
    assert 1.0 < snap.get("effective_rank", stream="encoder") <= D
    assert snap.get("samples", stream="encoder") == 12 * BATCH   # the window of steps 1-6 kept
    assert 0.0 <= snap.get("dormant_units_ratio", layer="encoder.1", tau=0.1) <= 1.0
    no_errors(mon)


@pytest.mark.slow                               # a tiny real transformers.Trainer training
def test_transformers_callback(tmp_path: Path) -> None:
    """Second half of block "Lightning / Hugging Face": a BERT built from a config (12 layers,
    so that ``bert.encoder.layer.11`` exists; width 16; nothing downloaded), 3 CPU steps."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    vocab, seq = 50, 8

    class Tokens(torch.utils.data.Dataset):                      # type: ignore[type-arg]
        def __init__(self, n: int = 48) -> None:
            gen = torch.Generator().manual_seed(3)
            self.ids = torch.randint(1, vocab, (n, seq), generator=gen)
            self.labels = torch.randint(0, 3, (n,), generator=gen)

        def __len__(self) -> int:
            return len(self.ids)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": self.ids[i], "attention_mask": torch.ones(seq, dtype=torch.long),
                    "labels": self.labels[i]}

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=12,
                                     num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=seq, num_labels=3)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"), max_steps=3, per_device_train_batch_size=16,
        report_to=[], use_cpu=True, save_strategy="no", dataloader_num_workers=0,
        disable_tqdm=True)
    ns: dict[str, Any] = {"model": transformers.BertForSequenceClassification(config),
                          "args": args, "ds": Tokens(), "Trainer": transformers.Trainer}
    run_snippet("transformers", ns)
    mon = ns["cb"].monitor
    assert mon is not None and mon._closed and mon.step_count == 3
    snap = mon.latest
    assert snap is not None
    for stream in ("bert.encoder.layer.11", "bert.pooler"):
        assert 1.0 <= snap.get("effective_rank", stream=stream) <= 16
    no_errors(mon)


# ------------------------------------------------------------------ meta-checks

def test_every_python_block_runs_or_is_allowed() -> None:
    """Each python block is covered line for line by SNIPPETS or listed in ALLOWED (with a
    reason), each SNIPPET and ALLOWED marker finds exactly one block, and each SNIPPET has a
    test that runs it: a new README block fails here until it is run or allow-listed."""
    blocks = python_blocks()
    assert blocks, "README.md has no ```python block"
    covered: dict[int, set[int]] = {}
    for snip in SNIPPETS.values():
        block = snip.block(blocks)
        first, end = snip.span(block)
        covered.setdefault(block.line, set()).update(range(first, end))
    for marker, reason in ALLOWED.items():
        found = [b for b in blocks if marker in b.code]
        assert len(found) == 1, f"ALLOWED marker {marker!r} is in {len(found)} python blocks"
        assert reason.strip(), f"ALLOWED[{marker!r}] needs a reason"
        assert found[0].line not in covered, f"block at line {found[0].line} is run and allowed"
        covered[found[0].line] = set(range(len(found[0].code.splitlines())))
    problems = []
    for b in blocks:
        lines = b.code.splitlines()
        left = [b.line + i for i, ln in enumerate(lines)
                if ln.strip() and i not in covered.get(b.line, set())]
        if left:
            problems.append(f"README.md lines {left} (block at line {b.line}) are neither run "
                            "nor allow-listed: add a SNIPPET (and its test) or an ALLOWED entry")
    assert not problems, "\n".join(problems)
    source = Path(__file__).read_text(encoding="utf-8")
    for name in SNIPPETS:
        assert f'run_snippet("{name}"' in source, f"no test runs snippet {name!r}"


def test_fences_are_known_languages() -> None:
    """Every fence is python (run above) or shell (checked below): an untagged or other block
    would escape both."""
    unknown = [(b.line, b.lang) for b in readme_blocks() if b.lang not in PYTHON + SHELL]
    assert not unknown, f"README.md fences of a language this test does not handle: {unknown}"


def test_readme_blocks_parser() -> None:
    """The fence reader: indented fences (list items), languages, README line numbers."""
    text = "a\n```python\nx = 1\n```\n- item\n  ```bash\n  repwatch serve\n  ```\n```\nraw\n```\n"
    assert readme_blocks(text) == [Block("python", "x = 1\n", 3),
                                   Block("bash", "repwatch serve\n", 7),
                                   Block("", "raw\n", 10)]


def test_a_failing_block_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """run_snippet fails when the README's code raises, naming the README line."""
    text = readme_text()
    fake = text.replace("from monitor import history\n",
                        "from monitor import history\nraise RuntimeError('boom')\n", 1)
    assert fake != text
    monkeypatch.setitem(globals(), "readme_text", lambda: fake)
    block = SNIPPETS["history"].block(python_blocks())
    with pytest.raises(ReadmeExampleError) as info:
        run_snippet("history", {})
    assert str(info.value).startswith(f"README.md:{block.line + 1}: `raise RuntimeError('boom')`")
    assert isinstance(info.value.__cause__, RuntimeError)


def _cli_commands() -> Iterator[tuple[str, str, bool]]:
    """``(where, command, complete)`` for each ``repwatch ...`` line of a shell block
    (complete commands) and each ``repwatch ...`` quoted inline in the prose (which may name a
    sub-command without its required arguments: `repwatch watch` polls ...)."""
    for b in readme_blocks():
        if b.lang in SHELL:
            for i, ln in enumerate(b.code.splitlines()):
                cmd = ln.split(" #")[0].strip()
                if cmd.startswith("repwatch "):
                    yield f"README.md:{b.line + i}", cmd, True
    prose = _strip_fences(readme_text())
    for span in re.findall(r"(?<!`)`([^`]+)`(?!`)", prose):
        cmd = " ".join(span.split())
        if cmd.startswith("repwatch "):
            yield "README.md (inline)", cmd, False


class _Parsed(Exception):
    pass


def test_cli_lines_parse(monkeypatch: pytest.MonkeyPatch,
                        capsys: pytest.CaptureFixture[str]) -> None:
    """Every ``repwatch`` command the README shows is accepted by the real parser (``repwatch
    = monitor.cli:main``): its sub-command, options and arguments exist. Nothing runs: the
    parse result is intercepted. ``[--opt]`` (optional parts) are parsed as given; an inline
    mention may only lack required arguments."""
    from monitor.cli import main

    original = argparse.ArgumentParser.parse_args

    def parse_only(self: argparse.ArgumentParser, args: Any = None, namespace: Any = None) -> Any:
        raise _Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    commands = list(_cli_commands())
    assert any(c.startswith("repwatch serve") for _, c, full in commands if full), commands
    problems = []
    for where, cmd, complete in commands:
        argv = shlex.split(cmd.replace("[", " ").replace("]", " "))[1:]
        capsys.readouterr()
        try:
            main(argv)
        except _Parsed as parsed:
            if not callable(getattr(parsed.args[0], "func", None)):
                problems.append(f"{where}: `{cmd}`: no sub-command")
        except SystemExit as exc:
            err = capsys.readouterr().err.strip().splitlines()
            if complete or "the following arguments are required" not in (err or [""])[-1]:
                problems.append(f"{where}: `{cmd}`: the parser refused it (exit {exc.code}): "
                                f"{(err or ['?'])[-1]}")
        else:
            problems.append(f"{where}: `{cmd}`: not parsed")
    assert not problems, "\n".join(problems)


def test_make_targets_exist() -> None:
    """The ``make TARGET`` lines of the shell blocks name targets of the Makefile."""
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([A-Za-z][\w.-]*)\s*:(?!=)", makefile, re.M))
    wanted = []
    for b in readme_blocks():
        if b.lang in SHELL:
            for ln in b.code.splitlines():
                words = ln.split(" #")[0].split()
                if words[:1] == ["make"]:
                    wanted += [w for w in words[1:] if "=" not in w and not w.startswith("-")]
    assert wanted, "no `make` line found in the README's shell blocks"
    missing = sorted(set(wanted) - targets)
    assert not missing, f"README.md names make targets the Makefile lacks: {missing}"
