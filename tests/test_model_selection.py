"""`repwatch select`: reading dumps and saved Monitor states, rankings, table, CLI, errors."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from monitor import Monitor
from monitor.model_selection import add_parser, format_table, load_representation, run, select


def _orth(d: int, gen: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, d, generator=gen))[0]


@pytest.fixture
def dumps(tmp_path: Path) -> dict[str, Path]:
    """Probe embeddings of 4 'models': 2 noisy rotated copies of a shared truth (one .npy),
    one unrelated, one dimensionally collapsed."""
    gen = torch.Generator().manual_seed(0)
    truth = torch.randn(256, 16, generator=gen)
    paths = {name: tmp_path / f"{name}.pt" for name in ("good", "other", "random", "collapsed")}
    torch.save(truth @ _orth(16, gen) + 0.3 * torch.randn(256, 16, generator=gen), paths["good"])
    paths["other"] = tmp_path / "other.npy"
    np.save(paths["other"], (truth @ _orth(16, gen) + 0.3 * torch.randn(256, 16, generator=gen)).numpy())
    torch.save(torch.randn(256, 16, generator=gen), paths["random"])
    collapsed = truth[:, :2] @ torch.randn(2, 16, generator=gen) + 1e-3 * torch.randn(256, 16, generator=gen)
    torch.save(collapsed, paths["collapsed"])
    return paths


def _state(path: Path, rows: torch.Tensor, streams: tuple[str, ...] = ("proj",)) -> Path:
    mon = Monitor(port=None, window=512, every=4, max_rows=256)
    for chunk in rows.split(64):
        for s in streams:
            mon.observe(s, chunk)
        mon.step()
    torch.save(mon.state_dict(), path)
    mon.close()
    return path


def test_dumps_are_ranked_by_both_criteria(dumps: dict[str, Path]) -> None:
    rows = select([dumps[k] for k in ("random", "collapsed", "good", "other")])
    by_name = {r["name"]: r for r in rows}
    assert by_name["collapsed"]["rankme_rank"] == 4                   # fewest directions
    assert {by_name["good"]["centrality_rank"], by_name["other"]["centrality_rank"]} == {1, 2}
    assert rows[-1]["name"] == "collapsed" and {rows[0]["name"], rows[1]["name"]} == {"good", "other"}
    assert [r["rank"] for r in rows] == [1, 2, 3, 4]
    assert all(r["n"] == 256 and r["d"] == 16 and r["source"] == "dump" for r in rows)
    # centrality is the numpy-checked functional value; RankMe by numpy SVD
    emb = np.load(dumps["other"]).astype(np.float64)
    s = np.linalg.svd(emb, compute_uv=False)
    p = s / s.sum() + 1e-7
    assert by_name["other"]["rankme"] == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-9)
    only = select([dumps[k] for k in ("random", "good", "other")], by="centrality")
    assert only[-1]["name"] == "random" and only[0]["rankme"] is None


def test_probe_rows_and_table(dumps: dict[str, Path]) -> None:
    rows = select([dumps["good"], dumps["random"]], probe=100, by="rankme")
    assert all(r["n"] == 100 for r in rows)
    table = format_table(rows)
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["#", "model", "source"]
    assert lines[2].split()[1] == rows[0]["name"] and lines[3].split()[1] == rows[1]["name"]
    assert "RankMe" in lines[0]


def test_saved_monitor_state_is_ranked_by_rankme(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(1)
    healthy = _state(tmp_path / "healthy.pt", torch.randn(384, 24, generator=gen))
    low = torch.randn(384, 3, generator=gen) @ torch.randn(3, 24, generator=gen)
    collapsed = _state(tmp_path / "collapsed.pt", low)
    rep = load_representation(healthy)
    assert rep.source == "monitor" and rep.stream == "proj" and tuple(rep.rows.shape) == (384, 24)
    rows = select([collapsed, healthy])                 # default "both": centrality not available
    assert [r["name"] for r in rows] == ["healthy", "collapsed"]
    assert rows[0]["centrality"] is None and rows[1]["rankme"] < 4.0
    assert "centrality not computed" in format_table(rows)
    with pytest.raises(ValueError, match="centrality needs embedding dumps"):
        select([collapsed, healthy], by="centrality")


def test_monitor_state_with_several_streams_needs_stream(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(2)
    path = _state(tmp_path / "two.pt", torch.randn(128, 8, generator=gen), streams=("a", "b"))
    with pytest.raises(ValueError, match=r"streams \['a', 'b'\]; choose one with --stream"):
        load_representation(path)
    with pytest.raises(ValueError, match=r"no stream 'c'.*\['a', 'b'\]"):
        load_representation(path, stream="c")
    assert load_representation(path, stream="b").stream == "b"


def test_cli_table_and_json(dumps: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="repwatch")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["select", str(dumps["collapsed"]), str(dumps["good"]), "--json"])
    assert args.func(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["rank"] for d in data] == [1, 2] and data[0]["name"] == "good"
    args = parser.parse_args(["select", str(dumps["good"]), str(dumps["random"]), "--by", "rankme"])
    assert run(args) == 0
    assert "RankMe" in capsys.readouterr().out
    args = parser.parse_args(["select", str(dumps["good"]) + ".missing"])
    assert run(args) == 2
    assert "no such file" in capsys.readouterr().err


def test_bad_inputs(tmp_path: Path, dumps: dict[str, Path]) -> None:
    torch.save(torch.zeros(4, 3, 2), tmp_path / "cube.pt")
    with pytest.raises(ValueError, match=r"expected an \(n, d\) embedding matrix, got shape \(4, 3, 2\)"):
        load_representation(tmp_path / "cube.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match=r"expected an \(n, d\) tensor, a repwatch Monitor "
                       r"state_dict, or a checkpoint dict holding one .* got a dict without a "
                       r"Monitor state \(keys: 'weights'\)"):
        load_representation(tmp_path / "ckpt.pt")
    (tmp_path / "x.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match=r"expected a .pt/.pth/.ckpt .* or .npy file, got '.csv'"):
        load_representation(tmp_path / "x.csv")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="cannot read it as a torch file"):
        load_representation(tmp_path / "junk.pt")
    bad = torch.randn(10, 3)
    bad[2, 1] = float("nan")
    torch.save(bad, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match="NaN or Inf"):
        load_representation(tmp_path / "nan.pt")
    np.save(tmp_path / "short.npy", np.random.default_rng(0).normal(size=(50, 16)))
    with pytest.raises(ValueError, match="row counts differ"):
        select([dumps["good"], tmp_path / "short.npy"], by="centrality")
    with pytest.raises(ValueError, match="fewer than probe=100"):
        select([dumps["good"], tmp_path / "short.npy"], probe=100)
    with pytest.raises(ValueError, match="by must be 'rankme', 'centrality', 'both'"):
        select([dumps["good"]], by="accuracy")
    with pytest.raises(ValueError, match="non-empty sequence"):
        select([])
    with pytest.raises(ValueError, match="probe must be an int >= 2"):
        select([dumps["good"]], probe=1)


# ---- checkpoints holding a Monitor state (issue 19, point 5) ---------------------------------


def _monitor_state(rows: torch.Tensor, streams: tuple[str, ...] = ("proj",)) -> dict:
    mon = Monitor(port=None, window=512, every=4, max_rows=256)
    for chunk in rows.split(64):
        for s in streams:
            mon.observe(s, chunk)
        mon.step()
    state = mon.state_dict()
    mon.close()
    return state


def test_readme_checkpoint_with_model_and_monitor_state(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """The README's own checkpoint, ``{"model": model.state_dict(), "repwatch":
    mon.state_dict()}``, is read: the Monitor state is found under its key."""
    gen = torch.Generator().manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(24, 24), torch.nn.ReLU())
    state = _monitor_state(torch.randn(384, 24, generator=gen))
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "repwatch": state}, path)
    rep = load_representation(path)
    assert (rep.source, rep.stream, rep.key) == ("monitor", "proj", "repwatch")
    assert tuple(rep.rows.shape) == (384, 24)
    plain = tmp_path / "plain.pt"
    torch.save(state, plain)                      # the same state saved alone: same rows
    assert torch.equal(load_representation(plain).rows, rep.rows)
    assert load_representation(plain).key == ""
    # the command line: `repwatch select ckpt.pt` ranks it
    from monitor.cli import main

    assert main(["select", str(path), str(plain), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {d["name"] for d in data} == {"ckpt", "plain"}
    assert all(d["source"] == "monitor" and d["n"] == 384 for d in data)


def test_nested_checkpoint_and_several_states_need_a_key(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A Lightning-style checkpoint (the state a few dicts down) is found; a file with several
    Monitor states names their keys and is read with ``--key``."""
    gen = torch.Generator().manual_seed(6)
    a = _monitor_state(torch.randn(256, 16, generator=gen))
    b = _monitor_state(torch.randn(256, 3, generator=gen) @ torch.randn(3, 16, generator=gen))
    lightning = tmp_path / "last.ckpt"
    torch.save({"epoch": 3, "state_dict": {"w": torch.zeros(2)},
                "callbacks": {"RepwatchCallback[run=exp1]": {"monitor": a}}}, lightning)
    rep = load_representation(lightning)
    assert rep.key == "callbacks/RepwatchCallback[run=exp1]/monitor" and rep.rows.shape[1] == 16

    two = tmp_path / "two.pt"
    torch.save({"model": {}, "monitors": {"student": a, "teacher": b}}, two)
    with pytest.raises(ValueError, match=r"holds 2 repwatch Monitor states, at keys "
                                         r"'monitors/student', 'monitors/teacher'; choose one "
                                         r"with --key"):
        load_representation(two)
    low = load_representation(two, key="monitors/teacher")
    assert low.key == "monitors/teacher"
    assert torch.equal(load_representation(two, key="/monitors/student/").rows,
                       load_representation(lightning).rows)
    with pytest.raises(ValueError, match=r"no key 'monitors/x' in this file; .*'monitors/student'"):
        load_representation(two, key="monitors/x")
    with pytest.raises(ValueError, match=r"the value at key 'model' is a dict, not a repwatch "
                                         r"Monitor state_dict"):
        load_representation(two, key="model")
    from monitor.cli import main

    assert main(["select", str(two)]) == 2
    assert "choose one with --key" in capsys.readouterr().err
    assert main(["select", str(two), str(lightning), "--key", "monitors/teacher",
                 "--by", "rankme"]) == 2          # last.ckpt has no such key: said clearly
    assert "last.ckpt: no key 'monitors/teacher'" in capsys.readouterr().err
    assert main(["select", str(two), "--key", "monitors/teacher", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["rankme"] < 4.0                    # the rank-3 teacher, not the student


def test_a_compact_state_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    with Monitor(run="c", window=64, max_rows=64, port=None) as mon:
        mon.observe("s", torch.randn(32, 8, generator=torch.Generator().manual_seed(0)))
        mon.step()
        torch.save(mon.state_dict(compact=True), tmp_path / "c.pt")
    with pytest.raises(ValueError, match="compact Monitor state"):
        load_representation(tmp_path / "c.pt")
