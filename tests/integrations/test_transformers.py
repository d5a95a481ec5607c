"""RepwatchCallback on a real (tiny, built from a config) transformers.Trainer training."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="Hugging Face transformers is not "
                                   "installed (pip install transformers); its callback cannot "
                                   "be tested")

from monitor.integrations.transformers import RepwatchCallback, state_file  # noqa: E402

pytestmark = pytest.mark.slow                   # trains tiny real models

VOCAB, SEQ = 100, 12


class Tokens(torch.utils.data.Dataset):
    """Random token sequences with 3 labels (seeded, no tokenizer, nothing downloaded)."""

    def __init__(self, n: int = 256) -> None:
        gen = torch.Generator().manual_seed(11)
        self.ids = torch.randint(1, VOCAB, (n, SEQ), generator=gen)
        self.labels = torch.randint(0, 3, (n,), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long),
                "labels": self.labels[i]}


def tiny_bert(seed: int) -> Any:
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=SEQ, num_labels=3)
    return transformers.BertForSequenceClassification(config)


def train(out: Path, cb: RepwatchCallback | None, max_steps: int, seed: int = 0,
          resume: Path | None = None, save_steps: int | None = None
          ) -> tuple[Any, list[float]]:
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=16,
        learning_rate=1e-3, logging_steps=1, report_to=[], use_cpu=True, seed=seed,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
        dataloader_num_workers=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=tiny_bert(seed), args=args, train_dataset=Tokens(),
                                   callbacks=[cb] if cb is not None else [])
    trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return trainer, losses


def test_metrics_steps_and_no_effect_on_training(tmp_path: Path) -> None:
    _, plain = train(tmp_path / "plain", None, max_steps=6, seed=5)
    cb = RepwatchCallback(layers=["bert.encoder.layer.1", "bert.pooler"],
                          activations=["bert.encoder.layer.0.intermediate.intermediate_act_fn"],
                          run="hf", every=3, port=None, max_rows=8, window=512)
    trainer, watched = train(tmp_path / "watched", cb, max_steps=6, seed=5)
    assert len(plain) == 6 and watched == plain             # bit-identical losses, dropout on
    mon = cb.monitor
    assert mon is not None and mon._closed
    assert trainer.state.global_step == 6 and mon.step_count == 6
    assert [s.step for s in mon.history] == [3, 6]
    snap = mon.latest
    assert snap is not None
    for stream, dim in (("bert.encoder.layer.1", 32), ("bert.pooler", 32)):
        er = snap.get("effective_rank", stream=stream)
        assert 1.0 < er <= dim
    frac = snap.get("dormant_units_ratio",
                    layer="bert.encoder.layer.0.intermediate.intermediate_act_fn", tau=0.0)
    assert 0.0 <= frac <= 1.0
    assert all(v == 0 for v in snap.errors.values())


def test_checkpoint_save_and_resume(tmp_path: Path) -> None:
    kw: dict[str, Any] = dict(layers=["bert.encoder.layer.1"], run="hfckpt", every=2, port=None,
                              max_rows=64, window=512)
    cb = RepwatchCallback(**kw)
    train(tmp_path, cb, max_steps=4, save_steps=4)
    saved = tmp_path / "checkpoint-4" / state_file(0)
    assert saved.is_file()
    state = torch.load(saved, weights_only=False)
    assert state["step"] == 4 and state["run"] == "hfckpt"
    assert cb.monitor is not None and cb.monitor.latest is not None
    er4 = cb.monitor.latest.get("effective_rank", stream="bert.encoder.layer.1")

    cb2 = RepwatchCallback(**kw)
    trainer2, _ = train(tmp_path, cb2, max_steps=8, resume=tmp_path / "checkpoint-4")
    mon2 = cb2.monitor
    assert mon2 is not None and trainer2.state.global_step == 8 and mon2.step_count == 8
    assert [s.step for s in mon2.history] == [6, 8]         # continued from step 4

    # the restored window itself: loading the file reproduces the step-4 effective rank
    from monitor import Monitor

    mon3 = Monitor(port=None, **{k: v for k, v in kw.items() if k not in ("layers", "port")})
    mon3.load_state_dict(state)
    snap = mon3.publish()
    mon3.close()
    assert math.isclose(snap.get("effective_rank", stream="bert.encoder.layer.1"), er4,
                        rel_tol=1e-9)


def test_hooks_return_none_and_only_main_process_serves(tmp_path: Path) -> None:
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    control = transformers.TrainerControl()
    model = tiny_bert(0)
    cb = RepwatchCallback(layers=["bert.pooler"], port=0)
    other = transformers.TrainerState(is_world_process_zero=False)
    assert cb.on_train_begin(args, other, control, model=model) is None
    assert cb.monitor is not None and cb.monitor.url is None
    assert cb.on_train_end(args, other, control) is None
    main = transformers.TrainerState(is_world_process_zero=True)
    assert cb.on_train_begin(args, main, control, model=model) is None
    try:
        assert cb.monitor.url is not None and cb.monitor.url.startswith("http://127.0.0.1:")
        main.global_step = 1
        assert cb.on_step_end(args, main, control) is None and cb.monitor.step_count == 1
        assert not any(vars(control).values())               # control untouched
    finally:
        cb.on_train_end(args, main, control)


def test_bad_arguments_fail_at_construction() -> None:
    with pytest.raises(ValueError, match="layers"):
        RepwatchCallback()
    with pytest.raises(ValueError, match="max_rows"):
        RepwatchCallback(layers=["bert"], max_rows=0)
    cb = RepwatchCallback(layers=["bert.nope"], port=None)
    args = transformers.TrainingArguments(output_dir="unused", report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="no submodule 'bert.nope'"):
        cb.on_train_begin(args, transformers.TrainerState(), transformers.TrainerControl(),
                          model=tiny_bert(0))


def _tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_publishes_reach_the_report_to_destinations(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """``report_to=["tensorboard"]``: the Trainer's TensorBoardCallback writes each publish's
    scalars (added to ``logs`` in ``on_log``) beside the loss, the final (partial) cadence
    included: published at the last step, before the Trainer's last log."""
    pytest.importorskip("tensorboard")
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    cb = RepwatchCallback(layers=["bert.pooler"], run="hf", every=2, port=None, max_rows=16,
                          window=512)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=5, per_device_train_batch_size=16,
        learning_rate=1e-3, logging_steps=1, report_to=["tensorboard"], use_cpu=True, seed=0,
        save_strategy="no", dataloader_num_workers=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=tiny_bert(0), args=args, train_dataset=Tokens(),
                                   callbacks=[cb])
    trainer.train()
    assert cb.monitor is not None and [s.step for s in cb.monitor.history] == [2, 4, 5]
    got = _tensorboard_scalars(tmp_path / "tb")
    assert [s for s, _ in got["train/loss"]] == [1, 2, 3, 4, 5]
    rank = got["train/repwatch/bert.pooler/effective_rank"]
    assert [s for s, _ in rank] == [2, 4, 5]             # logged once per publish
    for (step, value), snap in zip(rank, cb.monitor.history, strict=True):
        assert value == pytest.approx(snap.get("effective_rank", stream="bert.pooler"))
    assert "train/repwatch/alerts_firing" in got


def test_on_log_adds_each_publish_once(tmp_path: Path) -> None:
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    control, state = transformers.TrainerControl(), transformers.TrainerState()
    cb = RepwatchCallback(layers=["bert.pooler"], every=2, port=None)
    model = tiny_bert(0)
    cb.on_train_begin(args, state, control, model=model)
    try:
        model(input_ids=torch.randint(1, VOCAB, (4, SEQ)))
        for step in (1, 2):
            state.global_step = step
            cb.on_step_end(args, state, control)
            logs: dict[str, float] = {"loss": 1.0}
            assert cb.on_log(args, state, control, logs=logs) is None
            if step == 1:
                assert logs == {"loss": 1.0}                 # nothing published yet
            else:
                assert logs["repwatch/bert.pooler/effective_rank"] > 0
                assert logs["repwatch/alerts_firing"] == 0.0
        again: dict[str, float] = {"loss": 0.5}
        cb.on_log(args, state, control, logs=again)
        assert again == {"loss": 0.5}                        # already logged
    finally:
        cb.on_train_end(args, state, control)
