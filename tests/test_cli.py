"""The ``ember`` command as installed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ember
from ember.data import ShardWriter


def ember_cmd(*args, cwd=None):
    exe = shutil.which("ember", path=str(Path(sys.executable).parent)) or shutil.which("ember")
    assert exe, "the ember console script is not installed"
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_help_and_version():
    out = ember_cmd("--help")
    assert out.returncode == 0
    assert "inspect" in out.stdout and "demo" in out.stdout
    out = ember_cmd("--version")
    assert out.returncode == 0 and ember.__version__ in out.stdout


def test_inspect_describes_and_validates(tmp_path):
    with ShardWriter(tmp_path / "s.tok", 300) as w:
        w.add_document(np.arange(10))
        w.add_document([299, 5])
    out = ember_cmd("inspect", tmp_path / "s.tok", "--check-tokens")
    assert out.returncode == 0, out.stderr
    assert "documents   2" in out.stdout and "tokens      12" in out.stdout and "uint16" in out.stdout
    out = ember_cmd("inspect", tmp_path / "s.tok", "--check-tokens", "--vocab-size", "100")
    assert out.returncode == 2
    assert "s.tok" in out.stderr and "token 299 at token position 10" in out.stderr


def test_inspect_reports_bad_files_without_a_traceback(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(os.urandom(333))
    out = ember_cmd("inspect", junk)
    assert out.returncode == 2
    assert str(junk) in out.stderr and "Traceback" not in out.stderr
    out = ember_cmd("inspect", tmp_path / "missing")
    assert out.returncode == 2 and "no such file" in out.stderr


def test_bad_arguments_exit_2():
    out = ember_cmd("demo", "--steps", "many")
    assert out.returncode == 2 and "invalid int value" in out.stderr


@pytest.mark.slow
def test_demo_streams_the_stdlib_corpus(tmp_path):
    out = ember_cmd("demo", "--out", tmp_path / "cache", "--steps", "20", "--seq-len", "256")
    assert out.returncode == 0, out.stderr
    assert "M tokens/s" in out.stdout and "'position': 160" in out.stdout
    (corpus,) = (tmp_path / "cache").iterdir()
    assert any(p.suffix == ".tok" for p in (corpus / "train").iterdir())


def test_train_reports_config_problems_without_a_traceback(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model: {preset: tiny}\ntraining: {max_stepz: 3, warmup_steps: 5, max_steps: 2}\n")
    out = ember_cmd("train", cfg, "training.learning_rate=-1")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    for key in ("training.max_stepz", "training.warmup_steps", "training.learning_rate", "data.train"):
        assert key in out.stderr, out.stderr
    assert str(cfg) in out.stderr


@pytest.mark.slow
def test_train_runs_a_config_with_overrides_and_prints_a_sample(tmp_path):
    cfg = tmp_path / "small.yaml"
    cfg.write_text(
        "model: {preset: tiny, vocab_size: 259}\n"
        "training: {batch_size: 2, max_steps: 4, warmup_steps: 1}\n"
        f"data: {{train: 'builtin:stdlib', seq_len: 32, cache_dir: '{tmp_path / 'cache'}'}}\n"
        f"logging: {{run_dir: '{tmp_path / 'runs'}', progress_bar: false}}\n"
    )
    out = ember_cmd("train", cfg, "--sample-prompt", "import ", "training.max_steps=3")
    assert out.returncode == 0, out.stderr
    assert "trained to step 3" in out.stdout and "sample:" in out.stdout and "import " in out.stdout
    assert (tmp_path / "runs" / "small" / "checkpoints" / "step-00000003").is_dir()
