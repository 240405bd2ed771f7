"""The ``ember`` command as installed."""

from __future__ import annotations

import contextlib
import io
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


def test_train_refuses_bad_config_files_without_a_traceback(tmp_path):
    not_text = tmp_path / "not_text.yaml"
    not_text.write_bytes(b"model:\n  preset: tiny\n\xff\xfe\x00\x01")
    twice = tmp_path / "twice.yaml"
    twice.write_text("training:\n  max_steps: 10\ndata: {train: x}\ntraining:\n  batch_size: 2\n")
    out = ember_cmd("train", not_text)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert str(not_text) in out.stderr and "line 3, byte 22: the file is not UTF-8 text" in out.stderr, out.stderr
    out = ember_cmd("train", twice)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert str(twice) in out.stderr and "training: given twice, at lines 1 and 4" in out.stderr, out.stderr


def test_train_refuses_numbers_it_cannot_use_before_starting(tmp_path):
    blocker = tmp_path / "taken"
    blocker.write_text("")
    out = ember_cmd(
        "train", "quickstart",
        "training.batch_size=100000000000000000000", "training.max_steps=1", "training.warmup_steps=0",
        "training.learning_rate=.inf", "data.prefetch=100000", f"checkpoint.dir={blocker}",
        f"logging.run_dir={tmp_path / 'runs'}", f"data.cache_dir={tmp_path / 'cache'}",
        cwd=tmp_path,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "4 problems in" in out.stderr and "quickstart.yaml" in out.stderr
    for key in ("training.batch_size", "training.learning_rate", "data.prefetch", "checkpoint.dir"):
        assert f"  {key}: " in out.stderr, out.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


# ---------------------------------------------------------------------------
# ember convert


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, corpus) -> Path:
    """A run directory of a tiny model trained two steps: its checkpoint and its own export in hf/."""
    from ember.config import config_from_dict
    from ember.train import PretrainingOrchestrator

    root = tmp_path_factory.mktemp("convert")
    raw = {
        "model": {"preset": "tiny", "vocab_size": 259},
        "training": {"batch_size": 2, "max_steps": 2, "warmup_steps": 1, "seed": 3},
        "data": {"train": "builtin:stdlib", "seq_len": 32, "cache_dir": str(corpus)},
        "logging": {"run_dir": str(root / "runs"), "run_name": "r", "progress_bar": False},
    }
    PretrainingOrchestrator(config_from_dict(raw)).train()
    return root / "runs" / "r"


def copy_run(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "runs" / run.name))


def convert(*args, cwd: Path | None = None) -> tuple[int, str]:
    """``ember convert ARGS`` in this process: the exit code and what went to standard error."""
    from ember.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), contextlib.chdir(cwd or os.getcwd()):
        code = main(["convert", *map(str, args)])
    return code, err.getvalue()


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` (hidden ones too) with a file's content."""
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def test_convert_refuses_directories_it_did_not_write_and_deletes_nothing(tmp_path, trained_run):
    run = copy_run(trained_run, tmp_path)
    (checkpoint,) = (run / "checkpoints").iterdir()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("keep me too")
    before = snapshot(tmp_path)
    cases = [  # (checkpoint, out_dir, working directory, the directory the error names)
        (run, run, None, run),
        (".", "..", run, run.resolve().parent),  # from inside the run directory
        (run, mine, None, mine),
        (checkpoint, checkpoint, None, checkpoint),
        (run, a_file, None, a_file),
    ]
    for overwrite in ([], ["--overwrite"]):  # --overwrite replaces only an earlier export
        for source, out_dir, cwd, named in cases:
            code, err = convert(source, "--to", "hf", out_dir, *overwrite, cwd=cwd)
            assert code == 2, (out_dir, err)
            assert f"{os.path.abspath(named)}: " in err, err
            assert ("holds files Ember did not write" in err) or ("not a directory" in err), err
            assert "Traceback" not in err
            assert snapshot(tmp_path) == before, (out_dir, overwrite)
    out = ember_cmd("convert", ".", "--to", "hf", "..", cwd=run)  # the installed command, as a user types it
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"{run.resolve().parent}: holds files Ember did not write (r)" in out.stderr, out.stderr
    assert snapshot(tmp_path) == before


def test_convert_replaces_an_earlier_export_only_with_overwrite(tmp_path, trained_run):
    from ember.model.hf import load_hf_checkpoint

    run = copy_run(trained_run, tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    for out_dir in (tmp_path / "new" / "nested", empty):
        code, err = convert(run, "--to", "hf", out_dir)
        assert code == 0, err
        assert sorted(p.name for p in out_dir.iterdir()) == ["config.json", "ember_export.json", "model.safetensors"]
        load_hf_checkpoint(out_dir)
    (empty / "notes.txt").write_text("mine")
    before = snapshot(empty)
    code, err = convert(run, "--to", "hf", empty)
    assert code == 2 and f"{empty}: holds an earlier Hugging Face export" in err and "--overwrite" in err, err
    assert snapshot(empty) == before
    code, err = convert(run, "--to", "hf", empty, "--overwrite")
    assert code == 0, err
    assert (empty / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "new", "runs"]  # no temporary directory left
    # The run's own export is an earlier export too: replaced with --overwrite, with the same weights.
    weights = (run / "hf" / "model.safetensors").read_bytes()
    code, err = convert(run, "--to", "hf", run / "hf")
    assert code == 2 and "--overwrite" in err
    code, err = convert(run, "--to", "hf", run / "hf", "--overwrite")
    assert code == 0, err
    assert (run / "hf" / "model.safetensors").read_bytes() == weights


def damage(case: str, checkpoint: Path) -> Path:
    """Damages ``checkpoint`` as ``case`` says; returns the file the error must name."""
    def truncate(name: str) -> Path:
        path = checkpoint / name
        path.write_bytes(path.read_bytes()[:100])
        return path

    if case == "llama.json not JSON":
        (checkpoint / "llama.json").write_text("{vocab_size: 259")
        return checkpoint / "llama.json"
    if case == "llama.json not a mapping":
        (checkpoint / "llama.json").write_text("[259, 64]")
        return checkpoint / "llama.json"
    if case == "llama.json unknown field":
        (checkpoint / "llama.json").write_text('{"vocab_size": 259, "hiden_size": 64}')
        return checkpoint / "llama.json"
    if case == "llama.json bad value":
        (checkpoint / "llama.json").write_text('{"vocab_size": "many"}')
        return checkpoint / "llama.json"
    if case == "config.yaml not YAML":  # a checkpoint without llama.json reads its config
        (checkpoint / "llama.json").unlink()
        (checkpoint / "config.yaml").write_text("model: [tiny\n")
        return checkpoint / "config.yaml"
    if case == "trainer.pt truncated":
        return truncate("trainer.pt")
    if case == "trainer.pt missing":
        (checkpoint / "trainer.pt").unlink()
        return checkpoint
    if case == ".metadata truncated":
        return truncate(".metadata")
    if case == "weights truncated":
        truncate("__0_0.distcp")
        return checkpoint
    raise AssertionError(case)


DAMAGE = ["llama.json not JSON", "llama.json not a mapping", "llama.json unknown field", "llama.json bad value",
          "config.yaml not YAML", "trainer.pt truncated", "trainer.pt missing", ".metadata truncated", "weights truncated"]


@pytest.mark.parametrize("case", DAMAGE)
def test_convert_reports_a_damaged_checkpoint_without_a_traceback(case, tmp_path, trained_run):
    run = copy_run(trained_run, tmp_path)
    (checkpoint,) = (run / "checkpoints").iterdir()
    named = damage(case, checkpoint)
    code, err = convert(checkpoint, "--to", "hf", tmp_path / "out")
    assert code == 2, err
    assert f"{named}" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_convert_reports_paths_that_are_not_checkpoints(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    (tmp_path / "file.txt").write_text("x")
    for path, why in [(tmp_path / "missing", "no such file or directory"), (tmp_path / "notes", "no Ember checkpoint here"),
                      (tmp_path / "file.txt", "a file")]:
        out = ember_cmd("convert", path, "--to", "hf", tmp_path / "out")
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert f"{path}: {why}" in out.stderr, out.stderr
    assert not (tmp_path / "out").exists()
