"""One ember train per run directory: a second is refused at once, naming the holder;
a lock left by a killed run is taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ember.train import run_lock
from ember.train.run_lock import LOCK_FILE, STALE_SECONDS, RunDirInUse, RunLock

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def leave_lock(run_dir: Path, **holder) -> Path:
    """A lock file as a killed run leaves it: no flock on it, its details inside."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid(), "since": "2026-01-01T00:00:00+00:00", **holder}))
    return path


def test_a_second_lock_is_refused_naming_the_holder_and_the_file_goes_with_the_first(tmp_path):
    run_dir = tmp_path / "runs" / "r"
    with RunLock(run_dir):
        holder = json.loads((run_dir / LOCK_FILE).read_text())
        assert holder["host"] == socket.gethostname() and holder["pid"] == os.getpid()
        with pytest.raises(RunDirInUse) as refused:
            RunLock(run_dir).acquire()
        assert str(refused.value).startswith(
            f"{run_dir} is in use by another ember train (host {socket.gethostname()}, pid {os.getpid()}, since {holder['since']})"
        )
    assert not run_dir.exists()  # the lock created it and the run wrote nothing there
    run_dir.mkdir(parents=True)
    with RunLock(run_dir):
        pass
    assert list(run_dir.iterdir()) == []


@pytest.mark.parametrize("flock", [True, False], ids=["flock", "no flock"])
def test_the_lock_file_alone_refuses_a_second_run_where_flock_does_not_work(flock, tmp_path, monkeypatch):
    if not flock:
        monkeypatch.setattr(run_lock, "_flock", lambda fd: "unsupported")
    with RunLock(tmp_path / "r"), pytest.raises(RunDirInUse, match=f"pid {os.getpid()}"):
        RunLock(tmp_path / "r").acquire()


@pytest.mark.parametrize("flock", [True, False], ids=["flock", "no flock"])
def test_a_lock_left_by_a_dead_process_on_this_host_is_taken_over(flock, tmp_path, monkeypatch):
    if not flock:
        monkeypatch.setattr(run_lock, "_flock", lambda fd: "unsupported")
    path = leave_lock(tmp_path / "r")
    with RunLock(tmp_path / "r"):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not path.exists()


def test_a_lock_from_another_host_is_kept_until_it_goes_stale(tmp_path):
    path = leave_lock(tmp_path / "r", host="node-17", pid=4242)
    with pytest.raises(RunDirInUse) as refused:
        RunLock(tmp_path / "r").acquire()
    assert "(host node-17, pid 4242, since 2026-01-01T00:00:00+00:00)" in str(refused.value)
    assert f"If no ember train runs on node-17 any more, delete {path}" in str(refused.value)
    old = time.time() - STALE_SECONDS - 60  # its holder stopped touching it ten minutes ago
    os.utime(path, (old, old))
    with RunLock(tmp_path / "r"):
        assert json.loads(path.read_text())["host"] == socket.gethostname()


def test_a_lock_from_an_earlier_round_of_the_same_torchrun_job_is_taken_over(tmp_path, monkeypatch):
    """torchrun restarted the workers; rank 0 may now run on another machine."""
    leave_lock(tmp_path / "r", host="node-17", pid=4242, job="job-1", round=0)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-2")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    with pytest.raises(RunDirInUse):  # another job's
        RunLock(tmp_path / "r").acquire()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-1")
    with RunLock(tmp_path / "r"):
        assert json.loads((tmp_path / "r" / LOCK_FILE).read_text())["round"] == 1


def test_a_live_holder_keeps_the_lock_fresh(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "HEARTBEAT_SECONDS", 0.05)
    with RunLock(tmp_path / "r"):
        path = tmp_path / "r" / LOCK_FILE
        os.utime(path, (0, 0))
        time.sleep(0.5)
        assert time.time() - path.stat().st_mtime < 5


def write_config(tmp_path: Path, corpus: Path, **training) -> Path:
    raw = {
        "model": {"preset": "tiny", "vocab_size": 259},
        "training": {"batch_size": 4, "max_steps": 100000, "warmup_steps": 2, "seed": 7, **training},
        "data": {"train": "builtin:stdlib", "seq_len": 64, "cache_dir": str(corpus)},
        "checkpoint": {"every_n_steps": 20, "keep_last": 2, "export_hf": False},
        "logging": {"run_dir": str(tmp_path / "runs"), "run_name": "shared", "log_every": 1, "progress_bar": False},
    }
    path = tmp_path / f"run-{len(list(tmp_path.glob('run-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def start_holder(tmp_path: Path, corpus: Path) -> tuple[subprocess.Popen, Path]:
    """An `ember train` that runs for a while (a time budget), once it holds the run directory."""
    run = tmp_path / "runs" / "shared"
    cmd = [sys.executable, "-m", "ember", "train", str(write_config(tmp_path, corpus, time_budget=25)), "--no-sample"]
    first = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run / "metrics.jsonl").exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first.poll() is None, first.communicate()[1][-3000:]
    return first, run


@pytest.mark.slow
def test_a_second_ember_train_on_a_run_directory_in_use_is_refused_at_once(tmp_path, corpus):
    first, run = start_holder(tmp_path, corpus)
    config_before = (run / "config.yaml").read_text()
    # The same run continued from its latest checkpoint, as a restarted job would, with another
    # learning rate: had it started, it would have rewritten config.yaml, logged its own
    # losses into metrics.jsonl and pruned the first run's checkpoints.
    cfg = write_config(tmp_path, corpus, learning_rate=1e-3, time_budget=5)
    second = subprocess.run([sys.executable, "-m", "ember", "train", str(cfg), "--no-sample", "--resume", "auto"],
                            env=ENV, capture_output=True, text=True, timeout=300)
    assert first.poll() is None, "the first run ended before the second was refused"
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"ember train: error: {run} is in use by another ember train (host {socket.gethostname()}, pid {first.pid}, since " in second.stderr
    assert "Traceback" not in second.stderr
    assert (run / "config.yaml").read_text() == config_before
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert "stopped by time_budget" in out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, len(steps) + 1))  # one run's lines only, each step once
    assert not (run / LOCK_FILE).exists()


@pytest.mark.slow
def test_every_rank_of_a_refused_torchrun_job_stops_at_once(tmp_path, corpus):
    first, run = start_holder(tmp_path, corpus)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "ember", "train", str(write_config(tmp_path, corpus, time_budget=5)), "--no-sample", "--resume", "auto",
           "distributed.strategy=ddp", "training.batch_size=2"]
    second = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert first.poll() is None, "the first run ended before the second was refused"
    assert second.returncode != 0
    # Rank 1 hears of the refusal from rank 0 and stops too (torchrun may end it first).
    assert f"{run} is in use by another ember train (host {socket.gethostname()}, pid {first.pid}" in second.stderr
    assert not (run / "checkpoints").exists() or first.poll() is None
    first.kill()
    first.wait()
