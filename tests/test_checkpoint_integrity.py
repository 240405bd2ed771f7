"""Damaged and incomplete checkpoints: found by their manifest, skipped by --resume auto,
refused by name when asked for, never pruned in place of an intact one."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from ember.config import config_from_dict
from ember.distributed.checkpoint_io import CheckpointError, load_trainer_state
from ember.train import PretrainingOrchestrator
from ember.train.checkpoint import MANIFEST_FILE, inspect_checkpoint, latest_checkpoint, list_checkpoints

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def config(root: Path, corpus: Path, **training) -> dict:
    return {
        "model": {"preset": "tiny", "vocab_size": 259},
        "training": {"batch_size": 4, "max_steps": 12, "warmup_steps": 2, "learning_rate": 3e-3, "seed": 7, **training},
        "data": {"train": "builtin:stdlib", "seq_len": 64, "cache_dir": str(corpus)},
        "checkpoint": {"every_n_steps": 4, "keep_last": None, "export_hf": False},
        "logging": {"run_dir": str(root), "run_name": "t", "log_every": 1, "progress_bar": False},
    }


def losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}  # a resumed run's later lines win


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus) -> tuple[Path, dict[int, float]]:
    """A finished run with checkpoints at steps 4, 8 and 12, and its losses."""
    root = tmp_path_factory.mktemp("trained") / "runs"
    PretrainingOrchestrator(config_from_dict(config(root, corpus))).train()
    return root, losses(root / "t")


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A copy of the trained run to damage: its checkpoints directory."""
    shutil.copytree(trained[0], tmp_path / "runs")
    return tmp_path / "runs" / "t" / "checkpoints"


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if offset is None else offset] ^= 0x10
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def damage(kind: str, step_dir: Path) -> str:
    """Damages ``step_dir``; returns what the warning must name."""
    if kind == "flipped shard":
        flip_byte(step_dir / "__0_0.distcp")
        return f"{step_dir / '__0_0.distcp'}: checksum"
    if kind == "truncated shard":
        truncate(step_dir / "__0_0.distcp")
        return f"{step_dir / '__0_0.distcp'}: 727,408 bytes, the manifest says 1,454,816"
    if kind == "flipped trainer.pt":
        flip_byte(step_dir / "trainer.pt")
        return f"{step_dir / 'trainer.pt'}: checksum"
    if kind == "missing metadata":
        (step_dir / ".metadata").unlink()
        return f"{step_dir / '.metadata'}: missing"
    if kind == "no manifest, no trainer.pt":  # e.g. an empty step directory
        shutil.rmtree(step_dir)
        step_dir.mkdir()
        return f"{step_dir / MANIFEST_FILE}: missing, and so is trainer.pt"
    raise AssertionError(kind)


def train(root: Path, corpus: Path, resume: str | None, **training) -> dict:
    return PretrainingOrchestrator(config_from_dict(config(root, corpus, **training)), resume=resume).train()


def ember_train(root: Path, corpus: Path, *args: str) -> subprocess.CompletedProcess:
    cfg = root.parent / "run.yaml"
    cfg.write_text(yaml.safe_dump(config(root, corpus)))
    return subprocess.run([sys.executable, "-m", "ember", "train", str(cfg), "--no-sample", *args],
                          env=ENV, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("kind", ["flipped shard", "truncated shard", "flipped trainer.pt", "missing metadata", "no manifest, no trainer.pt"])
def test_resume_auto_skips_a_damaged_newest_checkpoint(kind, run, trained, corpus, capsys):
    """The newest checkpoint is damaged: --resume auto says which file is wrong and continues
    from the one before, exactly as the uninterrupted run did."""
    named = damage(kind, run / "step-00000012")
    summary = train(run.parent.parent, corpus, "auto")
    err = capsys.readouterr().err
    assert f"warning: skipping checkpoint {run / 'step-00000012'}: {named}" in err
    assert summary["start_step"] == 8 and summary["steps"] == 12
    assert losses(run.parent) == trained[1]  # steps 9-12 again, bit for bit
    assert inspect_checkpoint(run / "step-00000012", checksums=True).intact  # saved anew


@pytest.mark.parametrize("kind", ["flipped shard", "truncated shard"])
def test_resuming_from_a_damaged_checkpoint_by_name_is_refused_naming_the_file(kind, run, corpus):
    named = damage(kind, run / "step-00000012")
    before = sorted(p.name for p in run.parent.iterdir())
    done = ember_train(run.parent.parent, corpus, "--resume", str(run / "step-00000012"))
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"ember train: error: {run / 'step-00000012'}: not an intact checkpoint: {named}" in done.stderr
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in run.parent.iterdir()) == before


def test_an_empty_newest_step_directory_is_not_the_latest_checkpoint(run, corpus, capsys):
    (run / "step-00000016").mkdir()
    assert latest_checkpoint(run) == run / "step-00000012"
    assert train(run.parent.parent, corpus, "auto", max_steps=13)["start_step"] == 12
    assert "skipping checkpoint" in capsys.readouterr().err


def test_no_intact_checkpoint_at_all_is_an_error_not_a_fresh_start(run, corpus):
    for step in (4, 8, 12):
        flip_byte(run / f"step-{step:08d}" / "__0_0.distcp")
    with pytest.raises(CheckpointError, match="none of its checkpoints is intact"):
        train(run.parent.parent, corpus, "auto")
    assert [s for s, _ in list_checkpoints(run)] == [4, 8, 12]


def test_keep_last_never_deletes_the_newest_intact_checkpoint(run, corpus, capsys):
    """Step directories that are not intact neither count towards keep_last nor push the
    checkpoint just saved out (here two empty ones named after later steps, which pruning
    by name alone kept instead of it); they are never deleted, only reported."""
    (run / "step-00000020").mkdir()
    (run / "step-00000024").mkdir()
    truncate(run / "step-00000004" / "__0_0.distcp")
    cfg = config(run.parent.parent, corpus, max_steps=16)
    cfg["checkpoint"]["keep_last"] = 1
    PretrainingOrchestrator(config_from_dict(cfg), resume=str(run / "step-00000012")).train()
    assert [s for s, _ in list_checkpoints(run)] == [4, 16, 20, 24]
    assert inspect_checkpoint(run / "step-00000016", checksums=True).intact
    assert f"warning: {run / 'step-00000004'} is not an intact checkpoint, left in place" in capsys.readouterr().err


def test_a_checkpoint_from_before_manifests_still_resumes(run, trained, corpus, capsys):
    (run / "step-00000012" / MANIFEST_FILE).unlink()
    (run / "step-00000008" / MANIFEST_FILE).unlink()
    assert train(run.parent.parent, corpus, "auto", max_steps=14)["start_step"] == 12
    assert "has no manifest.json (written by an earlier Ember)" in capsys.readouterr().err
    # Without a manifest, completeness is still checked against the DCP metadata.
    truncate(run / "step-00000008" / "__0_0.distcp")
    assert "the checkpoint metadata needs 1,454,816 (truncated)" in inspect_checkpoint(run / "step-00000008").describe()


def damaged_pickle(path: Path) -> None:
    """A trainer.pt whose pickled part is damaged so that torch's weights-only unpickler
    rejects it (the error torch pairs with advice to load it with weights_only=False)."""
    raw = bytearray(path.read_bytes())
    entry = next(i for i in zipfile.ZipFile(io.BytesIO(bytes(raw))).infolist() if i.filename.endswith("data.pkl"))
    name_len, extra_len = struct.unpack("<HH", raw[entry.header_offset + 26 : entry.header_offset + 30])  # the local header's
    start = entry.header_offset + 30 + name_len + extra_len
    assert raw[start] == 0x80  # pickle's PROTO opcode
    raw[start + 2] = 0xE6  # the opcode after it: not an opcode at all
    path.write_bytes(bytes(raw))
    with pytest.raises(Exception, match="weights_only"):
        torch.load(path, weights_only=True)


def test_a_damaged_trainer_state_is_a_clean_error_naming_the_file(run, corpus):
    """Without a manifest to catch it first (an older checkpoint), a damaged trainer.pt
    still ends in one line naming it, without torch's advice to load it unsafely."""
    step_dir = run / "step-00000012"
    (step_dir / MANIFEST_FILE).unlink()
    damaged_pickle(step_dir / "trainer.pt")
    with pytest.raises(CheckpointError) as caught:
        load_trainer_state(step_dir / "trainer.pt")
    assert str(caught.value).startswith(f"{step_dir / 'trainer.pt'}: damaged, cannot be read (")
    assert "weights_only" not in str(caught.value) and "safe_globals" not in str(caught.value)
    done = ember_train(run.parent.parent, corpus, "--resume", "auto")
    assert done.returncode == 2
    assert f"ember train: error: {step_dir / 'trainer.pt'}: damaged, cannot be read" in done.stderr
    assert "weights_only" not in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_two_ranks_check_each_others_files(tmp_path, corpus):
    """On two ranks each writes and measures its own shard; on resume the checksums are
    shared out between the ranks and both take the same decision: a flipped byte in rank
    1's shard sends both back to the checkpoint before."""
    root = tmp_path / "runs"
    cfg = tmp_path / "run.yaml"
    raw = config(root, corpus, max_steps=8)
    raw["distributed"] = {"strategy": "fsdp"}
    cfg.write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "ember", "train", str(cfg), "--no-sample", "--resume", "auto"]
    first = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-5000:]
    step_dir = root / "t" / "checkpoints" / "step-00000008"
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "trainer.pt"} <= set(json.loads((step_dir / MANIFEST_FILE).read_text())["files"])
    flip_byte(step_dir / "__1_0.distcp")
    again = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-5000:]
    assert again.stderr.count(f"skipping checkpoint {step_dir}: {step_dir / '__1_0.distcp'}: checksum") == 1
    assert f"resumed from {root / 't' / 'checkpoints' / 'step-00000004'} at step 4" in again.stderr


def test_a_full_disk_while_saving_names_the_intact_previous_checkpoint(tmp_path, corpus, monkeypatch, capsys):
    """ENOSPC in the middle of a save (simulated in the strategy's writer): the run stops with
    one line naming the checkpoint it could not write and the intact one before it."""
    import errno

    import yaml

    from ember import cli
    from ember.distributed.single import SingleDeviceStrategy

    real_save, calls = SingleDeviceStrategy.save_checkpoint, {"n": 0}

    def save_checkpoint(self, directory, extra):
        calls["n"] += 1
        if calls["n"] == 2:
            (directory / "partial.distcp").write_bytes(b"x" * 10)
            raise OSError(errno.ENOSPC, "No space left on device", str(directory / "__0_0.distcp"))
        return real_save(self, directory, extra)

    monkeypatch.setattr(SingleDeviceStrategy, "save_checkpoint", save_checkpoint)
    cfg = tmp_path / "run.yaml"
    raw = {
        "model": {"preset": "tiny", "vocab_size": 259},
        "training": {"batch_size": 2, "max_steps": 6, "warmup_steps": 1, "seed": 1},
        "data": {"train": "builtin:stdlib", "seq_len": 32, "cache_dir": str(corpus)},
        "checkpoint": {"every_n_steps": 2},
        "logging": {"run_dir": str(tmp_path / "runs"), "run_name": "full", "progress_bar": False},
    }
    cfg.write_text(yaml.safe_dump(raw))
    assert cli.main(["train", str(cfg), "--no-sample"]) == 2
    err = capsys.readouterr().err
    ckpts = tmp_path / "runs" / "full" / "checkpoints"
    assert (
        f"No space left on device, while writing checkpoint {ckpts / 'step-00000004'} (not kept); "
        f"the previous checkpoint {ckpts / 'step-00000002'} is intact" in err
    ), err
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000002"]  # no temporary directory left
