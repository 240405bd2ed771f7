"""Training end to end on the CPU: loss falls on real text, checkpoints resume exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ember.config import config_from_dict, load_config
from ember.train import PretrainingOrchestrator
from ember.train.checkpoint import latest_checkpoint, list_checkpoints


def small_config(tmp_path: Path, corpus: Path, **sections) -> dict:
    raw = {
        "model": {"preset": "tiny", "vocab_size": 259},
        "training": {"batch_size": 4, "max_steps": 12, "warmup_steps": 2, "learning_rate": 3e-3, "eval_batches": 2, "seed": 7},
        "data": {"train": "builtin:stdlib", "seq_len": 64, "cache_dir": str(corpus)},
        "checkpoint": {"every_n_steps": 4, "keep_last": 2},
        "logging": {"run_dir": str(tmp_path / "runs"), "run_name": "t", "log_every": 1, "progress_bar": False},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(run_dir) if "loss" in m}


def run_cli_train(raw: dict, tmp_path: Path, *args: str) -> tuple[int, str]:
    """``ember train`` on ``raw`` as a user runs it: the exit code and what it printed to stderr."""
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "ember", "train", str(cfg_path), "--no-sample", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, done.stderr


def test_loss_falls_on_the_stdlib_corpus(tmp_path, corpus):
    raw = small_config(tmp_path, corpus, training={"max_steps": 60, "warmup_steps": 5, "eval_every": 30}, checkpoint={"every_n_steps": None})
    summary = PretrainingOrchestrator(config_from_dict(raw)).train()
    losses = train_losses(Path(summary["run_dir"]))
    assert len(losses) == 60
    first, last = sum(list(losses.values())[:5]) / 5, sum(list(losses.values())[-5:]) / 5
    assert last < 0.7 * first, (first, last)  # from ~5.5 (uniform over 259 bytes) to well below
    assert summary["val_loss"] < first and summary["steps"] == 60
    records = metrics(Path(summary["run_dir"]))
    assert sum("val_loss" in r for r in records) == 2  # at step 30 and at the end
    assert any(r.get("tokens_per_second") for r in records)
    saved = yaml.safe_load((Path(summary["run_dir"]) / "config.yaml").read_text())
    assert saved["training"]["max_steps"] == 60 and saved["model"]["preset"] == "tiny"


def test_sampling_needs_a_trained_model(tmp_path, corpus):
    orchestrator = PretrainingOrchestrator(config_from_dict(small_config(tmp_path, corpus)))
    with pytest.raises(RuntimeError, match="no trained model to sample from"):
        orchestrator.sample("def ")


def test_checkpoints_keep_the_last_k_and_refuse_silent_overwrite(tmp_path, corpus):
    raw = small_config(tmp_path, corpus)
    PretrainingOrchestrator(config_from_dict(raw)).train()
    ckpts = list_checkpoints(tmp_path / "runs" / "t" / "checkpoints")
    assert [s for s, _ in ckpts] == [8, 12]
    with pytest.raises(ValueError, match="already holds checkpoints.*--resume auto"):
        PretrainingOrchestrator(config_from_dict(raw)).train()
    assert [s for s, _ in list_checkpoints(tmp_path / "runs" / "t" / "checkpoints")] == [8, 12]


def test_half_written_checkpoint_is_never_picked(tmp_path):
    from ember.distributed.checkpoint_io import file_record

    d = tmp_path / "checkpoints"
    (d / "step-00000004").mkdir(parents=True)
    (d / "step-00000004" / "trainer.pt").write_bytes(b"state")  # complete: its manifest lists it
    (d / "step-00000004" / "manifest.json").write_text(json.dumps({"format": 1, "files": {"trainer.pt": file_record(d / "step-00000004" / "trainer.pt")}}))
    (d / ".step-00000008.tmp").mkdir()
    (d / "step-00000009.partial").mkdir()
    assert latest_checkpoint(d) == d / "step-00000004"


def test_resume_continues_exactly(tmp_path, corpus):
    whole = small_config(tmp_path, corpus, logging={"run_name": "whole"})
    PretrainingOrchestrator(config_from_dict(whole)).train()
    # Stop after step 6 by a token budget (a final checkpoint is saved), then continue.
    stopped = small_config(tmp_path, corpus, logging={"run_name": "part"}, training={"max_tokens": 6 * 4 * 64})
    assert PretrainingOrchestrator(config_from_dict(stopped)).train()["steps"] == 6
    part = small_config(tmp_path, corpus, logging={"run_name": "part"})
    assert PretrainingOrchestrator(config_from_dict(part), resume="auto").train()["start_step"] == 6
    a, b = train_losses(tmp_path / "runs" / "whole"), train_losses(tmp_path / "runs" / "part")
    assert b == a  # bit for bit, step by step


def test_stops_on_max_tokens_and_time_budget(tmp_path, corpus):
    s = PretrainingOrchestrator(config_from_dict(small_config(tmp_path, corpus, training={"max_tokens": 3 * 4 * 64 + 1}))).train()
    assert (s["steps"], s["stopped_by"]) == (4, "max_tokens")
    raw = small_config(tmp_path, corpus, training={"max_steps": 100000, "warmup_steps": 10, "time_budget": 2}, logging={"run_name": "tb"})
    t0 = time.monotonic()
    s = PretrainingOrchestrator(config_from_dict(raw)).train()
    assert s["stopped_by"] == "time_budget" and time.monotonic() - t0 < 60
    assert latest_checkpoint(tmp_path / "runs" / "tb" / "checkpoints").name == f"step-{s['steps']:08d}"


@pytest.mark.slow
def test_sigkill_then_resume_auto_gives_identical_losses(tmp_path, corpus):
    """A run killed with SIGKILL and resumed with --resume auto logs bit-for-bit the
    losses of a run never interrupted."""
    cfg_path = tmp_path / "run.yaml"
    raw = small_config(tmp_path, corpus, training={"max_steps": 16}, checkpoint={"every_n_steps": 3, "keep_last": 3})
    cfg_path.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "ember", "train", str(cfg_path), "--no-sample"]

    subprocess.run([*cmd, "logging.run_name=whole"], check=True, env=env, capture_output=True, timeout=600)

    run = tmp_path / "runs" / "killed"
    proc = subprocess.Popen([*cmd, "logging.run_name=killed"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if (run / "metrics.jsonl").exists() and max(train_losses(run), default=0) >= 8:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(train_losses(run))
    assert killed_at < 16, "the run finished before it could be killed"
    subprocess.run([*cmd, "logging.run_name=killed", "--resume", "auto"], check=True, env=env, capture_output=True, timeout=600)

    whole = train_losses(tmp_path / "runs" / "whole")
    # The resumed run re-logs the steps after its checkpoint; later lines win.
    resumed = train_losses(run)
    assert sorted(resumed) == list(range(1, 17))
    assert resumed == whole


@pytest.mark.slow
def test_compiled_model_trains_like_eager(tmp_path, corpus):
    eager = small_config(tmp_path, corpus, training={"max_steps": 3}, logging={"run_name": "eager"}, checkpoint={"every_n_steps": None})
    compiled = small_config(tmp_path, corpus, training={"max_steps": 3}, logging={"run_name": "compiled"}, checkpoint={"every_n_steps": None})
    compiled["model"]["compile"] = True
    PretrainingOrchestrator(config_from_dict(eager)).train()
    PretrainingOrchestrator(config_from_dict(compiled)).train()
    a, b = train_losses(tmp_path / "runs" / "eager"), train_losses(tmp_path / "runs" / "compiled")
    assert a.keys() == b.keys()
    assert all(abs(a[k] - b[k]) < 1e-4 for k in a), (a, b)
    # Checkpoints of compiled runs use the plain parameter names.
    from ember.distributed.checkpoint_io import SafeFileSystemReader

    names = SafeFileSystemReader(str(latest_checkpoint(tmp_path / "runs" / "compiled" / "checkpoints"))).read_metadata().state_dict_metadata
    assert "model.tok_embeddings.weight" in names
    assert all("_orig_mod" not in k for k in names)


def test_saved_config_continues_its_own_run(tmp_path, corpus):
    raw = small_config(tmp_path, corpus, training={"max_steps": 4})
    summary = PretrainingOrchestrator(config_from_dict(raw)).train()
    saved = Path(summary["run_dir"]) / "config.yaml"
    again = load_config(saved, ["training.max_steps=6"])
    assert again.run_dir == Path(summary["run_dir"])
    assert PretrainingOrchestrator(again, resume="auto").train()["start_step"] == 4


def test_shards_from_a_larger_vocabulary_are_refused(tmp_path, corpus):
    from ember.data import ShardWriter

    with ShardWriter(tmp_path / "big.tok", 128256) as w:
        w.add_document(list(range(2000)))
    raw = small_config(tmp_path, corpus, data={"train": str(tmp_path / "big.tok")})
    with pytest.raises(ValueError, match=r"big.tok: tokenized with a vocabulary of 128256.*vocab_size 259"):
        PretrainingOrchestrator(config_from_dict(raw)).train()


def test_train_prepares_data_named_in_the_config_first(tmp_path):
    texts = tmp_path / "texts"
    texts.mkdir()
    for i in range(30):
        (texts / f"{i:02d}.txt").write_text(f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * 20)
    raw = {
        "model": {"preset": "tiny", "vocab_size": 259},
        "training": {"batch_size": 2, "max_steps": 3, "warmup_steps": 1, "eval_batches": 2},
        "data": {"seq_len": 32, "tokenizer": "byte", "prepare": {"inputs": [str(texts)], "output": str(tmp_path / "tokens"), "validation_count": 5}},
        "checkpoint": {"every_n_steps": None},
        "logging": {"run_dir": str(tmp_path / "runs"), "run_name": "p", "progress_bar": False},
    }
    summary = PretrainingOrchestrator(config_from_dict(raw)).train()
    assert summary["steps"] == 3 and "val_loss" in summary
    manifest = json.loads((tmp_path / "tokens" / "manifest.json").read_text())
    assert manifest["splits"]["validation"]["documents"] == 5


def test_derived_fields_exist_before_train(tmp_path, corpus):
    """export_hf and evaluate read the architecture and precision: they are set when the orchestrator is built."""
    config = config_from_dict(small_config(tmp_path, corpus, model={"activation_checkpointing": "selective"}))
    orchestrator = PretrainingOrchestrator(config)
    assert orchestrator.llama_config == config.model.llama_config()
    assert orchestrator.precision == "fp32"  # auto on the CPU
    assert orchestrator.plan.activation_checkpointing == "selective"
    assert not (tmp_path / "runs").exists()  # building the orchestrator writes nothing


def test_train_state_round_trips_through_its_state_dict(tmp_path, corpus):
    """What a checkpoint holds beside the model: step, tokens, schedule, loader position, scaler, RNG."""
    import torch

    config = config_from_dict(small_config(tmp_path, corpus))
    first = PretrainingOrchestrator(config)
    state = first.build_state()
    batches = iter(state.loader)
    for _ in range(3):
        first.train_step(state, batches)
    saved = state.state_dict()
    assert (saved["step"], saved["tokens_seen"]) == (3, 3 * 4 * 64)
    expected_lr = state.scheduler.get_last_lr()
    expected_batch = next(batches)["input_ids"]
    expected_draw = torch.rand(3)

    second = PretrainingOrchestrator(config)
    fresh = second.build_state()
    fresh.load_state_dict(saved)
    assert (fresh.step, fresh.tokens_seen) == (3, 3 * 4 * 64)
    assert fresh.scheduler.get_last_lr() == expected_lr
    assert torch.equal(next(iter(fresh.loader))["input_ids"], expected_batch)
    assert torch.equal(torch.rand(3), expected_draw)


def test_grad_norm_the_strategy_does_not_report_is_not_logged(tmp_path, corpus, monkeypatch):
    """A strategy without a gradient norm (DeepSpeed when it computes none) logs no grad_norm, never a made-up one."""
    from ember.distributed.single import SingleDeviceStrategy

    monkeypatch.setattr(SingleDeviceStrategy, "clip_grad_norm", lambda self, max_norm: None)
    summary = PretrainingOrchestrator(config_from_dict(small_config(tmp_path, corpus, training={"max_steps": 2}))).train()
    steps = [m for m in metrics(Path(summary["run_dir"])) if "loss" in m]
    assert len(steps) == 2 and all("grad_norm" not in m for m in steps)


def test_validation_smaller_than_a_batch_is_refused_before_training(tmp_path, corpus):
    """Found before step 1, so no training time is spent on a run that could not finish."""
    from ember.data import ShardWriter

    with ShardWriter(tmp_path / "val.tok", vocab_size=259) as w:
        w.add_document([i % 256 for i in range(200)])  # three samples of 64 + 1 tokens: less than one batch of 4
    raw = small_config(tmp_path, corpus, data={"validation": str(tmp_path / "val.tok")})
    with pytest.raises(ValueError, match=r"data.validation .*val.tok.* yields no full batch of 4 x 64 tokens"):
        PretrainingOrchestrator(config_from_dict(raw)).train()
    assert not (tmp_path / "runs" / "t" / "checkpoints").exists()
    assert not (tmp_path / "runs" / "t" / "metrics.jsonl").exists()


def test_divergence_skips_steps_then_stops_naming_the_last_good_checkpoint(tmp_path, corpus):
    """A huge learning rate makes the loss non-finite: those steps are skipped, counted, logged
    as null, and after training.max_skipped_steps in a row the run stops without saving."""
    raw = small_config(
        tmp_path, corpus,
        training={"max_steps": 40, "warmup_steps": 0, "learning_rate": 1e6, "clip_grad_norm": None, "max_skipped_steps": 3},
        checkpoint={"every_n_steps": 1, "keep_last": None},
    )
    rc, err = run_cli_train(raw, tmp_path)
    assert rc == 3, err
    assert "training diverged: loss or gradient norm not finite for 3 steps in a row" in err
    ckpts = list_checkpoints(tmp_path / "runs" / "t" / "checkpoints")
    assert ckpts and f"the last good checkpoint is {ckpts[-1][1]}" in err
    records = [r for r in metrics(tmp_path / "runs" / "t") if "loss" in r]
    skipped = [r for r in records if r["loss"] is None or (r.get("grad_norm", 0) is None)]
    assert len(skipped) == 3 and [r["skipped_steps"] for r in skipped] == [1, 2, 3]
    # Skipped steps leave the weights as they were, so their checkpoints are good ones;
    # the step that stopped the run saved nothing.
    assert records[-1]["step"] == ckpts[-1][0] + 1
    assert "Infinity" not in (tmp_path / "runs" / "t" / "metrics.jsonl").read_text()
    assert not (tmp_path / "runs" / "t" / "hf").exists()


def test_a_non_finite_step_is_skipped_and_training_goes_on(tmp_path, corpus, monkeypatch):
    """One poisoned step: no optimizer step (the weights are untouched), the run recovers and finishes."""
    import torch

    from ember.model import Llama

    real_forward, calls = Llama.forward, {"n": 0}

    def forward(self, *args, **kwargs):
        calls["n"] += 1
        loss = real_forward(self, *args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 and self.training else loss

    monkeypatch.setattr(Llama, "forward", forward)
    orchestrator = PretrainingOrchestrator(config_from_dict(small_config(tmp_path, corpus, training={"max_steps": 6})))
    state = orchestrator.build_state()
    batches = iter(state.loader)
    for _ in range(2):
        assert orchestrator.train_step(state, batches).finite
    before = [p.detach().clone() for p in state.model.parameters()]
    result = orchestrator.train_step(state, batches)
    assert not result.finite and state.skipped_steps == 1 and state.step == 3
    assert all(torch.equal(a, b) for a, b in zip(before, state.model.parameters()))
    assert orchestrator.train_step(state, batches).finite
    assert not all(torch.equal(a, b) for a, b in zip(before, state.model.parameters()))


def test_no_checkpoint_is_written_from_non_finite_weights(tmp_path, corpus):
    import torch

    from ember.train.checkpoint import Checkpointer
    from ember.train.metrics import MetricsLogger
    from ember.train.orchestrator import TrainingDiverged

    config = config_from_dict(small_config(tmp_path, corpus))
    orchestrator = PretrainingOrchestrator(config)
    state = orchestrator.build_state()
    with torch.no_grad():
        next(state.model.parameters())[0, 0] = float("inf")
    checkpointer = Checkpointer(config.checkpoint_dir, orchestrator.strategy)
    logger = MetricsLogger(tmp_path / "log", enabled=False, total_steps=1, start_step=0, progress_bar=False)
    with pytest.raises(TrainingDiverged, match="the weights are not finite.*no checkpoint yet"):
        orchestrator._save(checkpointer, state, logger)
    assert list_checkpoints(config.checkpoint_dir) == []


def stop_with_signal(cmd: list[str], run: Path, signum: int, after_step: int) -> tuple[int, str, int]:
    """Starts ``cmd``, sends ``signum`` once ``run`` has logged ``after_step``; (exit code, stderr, last logged step)."""
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not ((run / "metrics.jsonl").exists() and max(train_losses(run), default=0) >= after_step):
        time.sleep(0.02)
    proc.send_signal(signum)
    err = proc.communicate(timeout=300)[1]
    return proc.returncode, err, max(train_losses(run))


@pytest.mark.slow
def test_sigterm_saves_the_step_and_resuming_matches_the_uninterrupted_run(tmp_path, corpus):
    """What a scheduler sends before it kills a job: the current step finishes, a checkpoint of
    it is saved, the run exits 143 saying how to continue, and --resume auto then logs the
    uninterrupted run's losses bit for bit."""
    cfg_path = tmp_path / "run.yaml"
    raw = small_config(tmp_path, corpus, training={"max_steps": 16}, checkpoint={"every_n_steps": None, "keep_last": None})
    cfg_path.write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "ember", "train", str(cfg_path), "--no-sample"]
    subprocess.run([*cmd, "logging.run_name=whole"], check=True, capture_output=True, timeout=600)

    run = tmp_path / "runs" / "stopped"
    rc, err, stopped_at = stop_with_signal([*cmd, "logging.run_name=stopped"], run, signal.SIGTERM, after_step=3)
    assert rc == 128 + signal.SIGTERM, err
    assert stopped_at < 16, "the run finished before the signal"
    saved = run / "checkpoints" / f"step-{stopped_at:08d}"
    assert saved.is_dir() and f"stopped by SIGTERM after step {stopped_at}, saved in {saved}; continue with --resume auto" in err
    assert "Traceback" not in err

    subprocess.run([*cmd, "logging.run_name=stopped", "--resume", "auto"], check=True, capture_output=True, timeout=600)
    assert train_losses(run) == train_losses(tmp_path / "runs" / "whole")


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGUSR1])
def test_ctrl_c_and_slurms_early_signal_also_save_and_stop(tmp_path, corpus, signum):
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(small_config(tmp_path, corpus, training={"max_steps": 400}, checkpoint={"every_n_steps": None})))
    run = tmp_path / "runs" / "t"
    rc, err, stopped_at = stop_with_signal([sys.executable, "-m", "ember", "train", str(cfg_path), "--no-sample"], run, signum, 2)
    assert rc == 128 + signum and f"stopped by {signal.Signals(signum).name} after step {stopped_at}" in err, err
    assert (run / "checkpoints" / f"step-{stopped_at:08d}").is_dir() and stopped_at < 400


@pytest.mark.slow
def test_a_second_sigint_aborts_at_once(tmp_path, corpus):
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(small_config(tmp_path, corpus, training={"max_steps": 400}, checkpoint={"every_n_steps": None})))
    run = tmp_path / "runs" / "t"
    proc = subprocess.Popen([sys.executable, "-m", "ember", "train", str(cfg_path), "--no-sample"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not ((run / "metrics.jsonl").exists() and max(train_losses(run), default=0) >= 2):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert max(train_losses(run)) < 400


def test_resume_applies_the_configs_learning_rate_and_decay(tmp_path, corpus):
    """"Lower the learning rate after a spike and resume" must take effect, and say so."""
    first = small_config(tmp_path, corpus, training={"max_steps": 4, "warmup_steps": 0, "lr_scheduler": "constant"})
    PretrainingOrchestrator(config_from_dict(first)).train()
    lowered = small_config(
        tmp_path, corpus,
        training={"max_steps": 6, "warmup_steps": 0, "lr_scheduler": "constant", "learning_rate": 1e-4, "weight_decay": 0.01},
    )
    orchestrator = PretrainingOrchestrator(config_from_dict(lowered), resume="auto")
    orchestrator.train()
    records = metrics(tmp_path / "runs" / "t")
    lrs = {r["step"]: r["lr"] for r in records if "lr" in r}
    assert lrs[4] == pytest.approx(3e-3) and lrs[5] == pytest.approx(1e-4) and lrs[6] == pytest.approx(1e-4)


def test_resume_reports_what_changed(tmp_path, corpus, capfd):
    PretrainingOrchestrator(config_from_dict(small_config(tmp_path, corpus, training={"max_steps": 4}))).train()
    capfd.readouterr()
    changed = small_config(tmp_path, corpus, training={"max_steps": 6, "learning_rate": 1e-3, "betas": [0.9, 0.99]})
    PretrainingOrchestrator(config_from_dict(changed), resume="auto").train()
    err = capfd.readouterr().err
    assert "changed since that checkpoint, and applied: training.betas [0.9, 0.95] -> [0.9, 0.99]; training.learning_rate 0.003 -> 0.001" in err


def test_resume_refuses_changes_that_cannot_apply_naming_each_key(tmp_path, corpus):
    PretrainingOrchestrator(config_from_dict(small_config(tmp_path, corpus, training={"max_steps": 4}))).train()
    changed = small_config(tmp_path, corpus, training={"max_steps": 6, "seed": 8}, data={"seq_len": 32})
    changed["model"]["num_hidden_layers"] = 3
    with pytest.raises(ValueError, match=r"cannot resume with these changes: model.num_hidden_layers: 2 in the checkpoint, 3 now; "
                       r"data.seq_len: 64 in the checkpoint, 32 now; training.seed: 7 in the checkpoint, 8 now"):
        PretrainingOrchestrator(config_from_dict(changed), resume="auto").train()
    # The run's saved config still describes the run, so `ember train runs/t/config.yaml --resume auto` works.
    assert yaml.safe_load((tmp_path / "runs" / "t" / "config.yaml").read_text())["data"]["seq_len"] == 64
