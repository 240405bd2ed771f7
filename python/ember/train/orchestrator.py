"""``PretrainingOrchestrator``: one training run from a :class:`~ember.config.Config`.

``_train`` reads top to bottom: build the :class:`~ember.train.state.TrainState` (resuming
it from a checkpoint when asked), then per step ``train_step`` (micro-batches forward and
backward, clip, optimizer step), monitor, log, validate, checkpoint. Everything that
differs between single-device, DDP, FSDP and DeepSpeed runs sits behind the strategy
interface (``ember.distributed.base.Strategy``); how the model is parallelized is
``ember.model.parallelize``; where the data comes from is ``ember.train.data``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import yaml

from ember.config import Config, parse_duration
from ember.data import TokenLoader
from ember.distributed import make_strategy
from ember.model import Llama, LlamaConfig
from ember.model.config import flops_per_token
from ember.model.hf import check_export_dir, save_hf_checkpoint, weights_loader
from ember.model.parallelize import ParallelPlan
from ember.train.checkpoint import ARCHITECTURE_FILE, CONFIG_FILE, Checkpointer, latest_checkpoint, list_checkpoints, resume_checkpoint, step_dir_name, verify_checkpoint
from ember.train.data import build_loaders
from ember.train.metrics import MetricsLogger, perplexity
from ember.train.optim import build_optimizer
from ember.train.preemption import Preempted, StopRequest
from ember.train.run_lock import hold_run_dir
from ember.train.schedule import build_scheduler
from ember.train.speed_monitor import SpeedMonitor
from ember.train.state import TrainState

RESOLVED_CONFIG = "config.yaml"
HF_EXPORT_DIR = "hf"


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm stayed non-finite (or the weights stopped being finite);
    the run stopped without saving, and the message names the last good checkpoint."""


class StepResult(NamedTuple):
    loss: torch.Tensor  # this rank's mean loss over the step's micro-batches (on the device)
    grad_norm: torch.Tensor | None  # before clipping; None when the engine reports none
    finite: bool  # loss and gradient norm finite on every rank; if not, no optimizer step was taken


class PretrainingOrchestrator:
    """Trains the model a config describes; ``train()`` returns a summary dict.

    The config is read when the orchestrator is built (the architecture, the precision,
    the parallel plan, the config saved with the run), so change the config before
    building it, not after."""

    def __init__(self, config: Config, *, resume: str | None = None):
        self.config = config
        self.resume = resume if resume is not None else config.checkpoint.resume
        self.strategy = make_strategy(config)
        self.llama_config: LlamaConfig = config.model.llama_config()
        self.precision = self._precision()
        self.plan = ParallelPlan(
            activation_checkpointing=config.activation_checkpointing,
            compile=config.model.compile,
            param_dtype=torch.bfloat16 if self.precision == "bf16-true" else None,
        )
        # The saved config names its run, so `ember train runs/x/config.yaml --resume auto` continues it.
        saved = config.to_dict()
        saved["logging"]["run_name"] = config.run_name
        self.config_yaml = yaml.safe_dump(saved, sort_keys=False)
        self.model: torch.nn.Module | None = None  # the trained model, after a single-strategy train()
        self.val_loader: TokenLoader | None = None

    # -- building -----------------------------------------------------------

    def _precision(self) -> str:
        p = self.config.training.precision
        if self.strategy.owns_precision:
            return "engine"
        if p == "auto":
            cuda = self.strategy.device.type == "cuda"
            return "bf16-mixed" if cuda and torch.cuda.is_bf16_supported() else "fp32"
        return p

    def _autocast(self) -> contextlib.AbstractContextManager:
        dtype = {"bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}.get(self.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.strategy.device.type, dtype=dtype)

    def _build_model(self) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        t = self.config.training
        with torch.device("meta"):
            model = Llama(self.llama_config)

        def make_optimizer(m: torch.nn.Module) -> torch.optim.Optimizer:
            return build_optimizer(m, lr=t.learning_rate, weight_decay=t.weight_decay, betas=t.betas, eps=t.eps)

        def init_weights(m: torch.nn.Module) -> None:
            m.init_weights(seed=t.seed)

        if self.config.model.init_from is not None:
            # Continual pretraining: each rank reads its own shards of the checkpoint.
            init_weights = weights_loader(self.config.model.init_from)  # noqa: F811

        return self.strategy.prepare(model, self.plan, make_optimizer, init_weights)

    def build_state(self) -> TrainState:
        """Seeds the generators and builds step 0 of a run on this rank: the loaders, the
        model (parallelized and placed by the strategy), optimizer, schedule and gradient
        scaler. Every rank calls it after ``strategy.setup()``."""
        t, s = self.config.training, self.strategy
        torch.manual_seed(t.seed)
        random.seed(t.seed)
        loader, self.val_loader = build_loaders(self.config, s, self.llama_config.vocab_size)
        model, optimizer = self._build_model()
        scheduler = build_scheduler(
            optimizer, warmup_steps=t.warmup_steps, max_steps=t.max_steps, schedule=t.lr_scheduler, min_lr_ratio=t.min_lr_ratio
        )
        scaler = torch.amp.GradScaler(s.device.type, enabled=self.precision == "fp16-mixed")
        return TrainState(model, optimizer, scheduler, scaler, loader)

    # -- the run --------------------------------------------------------------

    def _resume_point(self) -> Path | None:
        ckpt_dir = self.config.checkpoint_dir
        existing = list_checkpoints(ckpt_dir)
        if self.resume is None:
            if existing:
                raise ValueError(
                    f"{ckpt_dir} already holds checkpoints (latest: step {existing[-1][0]}). "
                    "Pass --resume auto (checkpoint.resume=auto) to continue that run, "
                    "or set logging.run_name to start a new one."
                )
            return None
        if self.resume == "auto":
            return resume_checkpoint(ckpt_dir, self.strategy)
        path = Path(self.resume)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: checkpoint to resume from not found")
        verify_checkpoint(path, self.strategy)
        return path

    def _check_resumable(self, checkpoint: Path) -> None:
        """Refuses to resume with settings that cannot change mid-run (the architecture, which
        shapes the weights; seq_len and seed, which decide the data order), naming each."""
        problems = []
        saved_arch = checkpoint / ARCHITECTURE_FILE
        if saved_arch.is_file():
            old = json.loads(saved_arch.read_text())
            new = dataclasses.asdict(self.llama_config)
            problems += [f"model.{k}: {old[k]!r} in the checkpoint, {new[k]!r} now" for k in new if k in old and old[k] != new[k]]
        saved_cfg = checkpoint / CONFIG_FILE
        if saved_cfg.is_file():
            old_cfg = yaml.safe_load(saved_cfg.read_text()) or {}
            for section, key, now in (("data", "seq_len", self.config.data.seq_len), ("training", "seed", self.config.training.seed)):
                was = (old_cfg.get(section) or {}).get(key, now)
                if was != now:
                    problems.append(f"{section}.{key}: {was!r} in the checkpoint, {now!r} now")
        if problems:
            raise ValueError(
                f"{checkpoint}: cannot resume with these changes: {'; '.join(problems)}. They decide the weights' "
                "shapes or the order of the data: set them back, or start a new run (logging.run_name)"
            )

    def _apply_optimizer_settings(self, state: TrainState) -> list[str]:
        """After a resume, the config's learning rate, weight decay, betas and eps replace the
        checkpoint's (the optimizer's saved groups would otherwise win: lowering the learning
        rate after a loss spike must take effect). Returns what changed."""
        t, sched = self.config.training, state.scheduler
        changed: dict[str, str] = {}
        for i, group in enumerate(state.optimizer.param_groups):
            wanted = {
                "weight_decay": t.weight_decay if group.get("name", "decay") == "decay" else 0.0,
                "betas": tuple(t.betas),
                "eps": t.eps,
            }
            for key, value in wanted.items():
                old = tuple(group[key]) if key == "betas" else group[key]
                if old != value:
                    changed[f"training.{key}"] = f"training.{key} {list(old) if key == 'betas' else old} -> {list(value) if key == 'betas' else value}"
                    group[key] = value
            if sched.base_lrs[i] != t.learning_rate:
                changed["training.learning_rate"] = f"training.learning_rate {sched.base_lrs[i]} -> {t.learning_rate}"
                sched.base_lrs[i] = group["initial_lr"] = t.learning_rate
                group["lr"] = t.learning_rate * sched.lr_lambdas[i](sched.last_epoch)
        if changed:
            sched._last_lr = [g["lr"] for g in state.optimizer.param_groups]  # what get_last_lr() reports
        return list(changed.values())

    def train(self, *, sample_prompt: str | None = None) -> dict[str, Any]:
        """Runs training to the end and returns a summary. With ``sample_prompt`` and the
        byte tokenizer, the summary also holds ``sample``: text the trained model writes."""
        s = self.strategy
        s.setup()
        finished = False
        try:
            with hold_run_dir(self.config.run_dir, s), StopRequest() as stop:  # before the run writes anything there
                summary = self._train(stop)
            if sample_prompt is not None and (self.config.data.prepare.tokenizer or self.config.data.tokenizer) == "byte":
                summary["sample"] = self.sample(sample_prompt)
            finished = True
            return summary
        finally:
            if dist.is_initialized():
                # Everything that holds the process group goes before the group does (see
                # Strategy.release); the checkpoint and the Hugging Face export keep the weights.
                self.model = None
            s.teardown(failed=not finished)

    def _train(self, stop: StopRequest) -> dict[str, Any]:
        cfg, t, s = self.config, self.config.training, self.strategy
        resume_from = self._resume_point()
        if cfg.checkpoint.export_hf and s.is_main:
            check_export_dir(cfg.run_dir / HF_EXPORT_DIR, overwrite=True)  # refused now, not after training
        if resume_from is not None:
            self._check_resumable(resume_from)  # before config.yaml records settings it refuses
        if s.is_main:
            cfg.run_dir.mkdir(parents=True, exist_ok=True)
            (cfg.run_dir / RESOLVED_CONFIG).write_text(self.config_yaml)
        state = self.build_state()
        checkpointer = Checkpointer(cfg.checkpoint_dir, s, cfg.checkpoint.keep_last)
        if resume_from is not None:
            checkpointer.load(resume_from, state)
            changed = self._apply_optimizer_settings(state)
        start_step = state.step
        last_step, stopped_by = self._last_step()
        deadline = None if t.time_budget is None else time.monotonic() + parse_duration(t.time_budget)
        monitor, logger = self._speed_monitor(), self._logger(last_step, start_step)
        if resume_from is not None:
            logger.message(f"resumed from {resume_from} at step {start_step}")
            if changed:
                logger.message("changed since that checkpoint, and applied: " + "; ".join(changed))
        batches = iter(state.loader)
        state.model.train()
        loss_sum, loss_count, skip_streak = torch.zeros((), device=s.device), 0, 0
        try:
            while state.step < last_step:
                step = self.train_step(state, batches)
                monitor.update(samples=self.samples_per_step, tokens=self.tokens_per_step)
                loss_sum, loss_count = loss_sum + step.loss, loss_count + 1
                skip_streak = 0 if step.finite else skip_streak + 1
                if state.step % cfg.logging.log_every == 0 or state.step == last_step or not step.finite:
                    self._log_step(state, logger, monitor, s.reduce_mean(loss_sum / loss_count), step.grad_norm)
                    loss_sum, loss_count = torch.zeros_like(loss_sum), 0
                    if deadline is not None and s.broadcast_flag(time.monotonic() > deadline):
                        stopped_by = "time_budget"
                        break
                if not step.finite:
                    self._on_skipped_step(state, logger, skip_streak)
                if s.any_rank(stop.requested):
                    self._preempted(state, checkpointer, logger, stop)
                if self.val_loader is not None and _due(t.eval_every, state.step, last_step):
                    self._validate(state, logger)
                if _due(cfg.checkpoint.every_n_steps, state.step, last_step):
                    self._save(checkpointer, state, logger)
            summary = self._finish(state, checkpointer, logger, start_step)
        finally:
            logger.close()
        summary.update({"steps": state.step, "tokens_seen": state.tokens_seen, "stopped_by": stopped_by})
        self.model = state.model
        return summary

    def train_step(self, state: TrainState, batches: Iterator[dict[str, torch.Tensor]]) -> StepResult:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches from ``batches``.

        When the loss or the gradient norm is not finite on any rank, every rank skips the
        optimizer step (the batch is still consumed and the schedule still advances, so the
        data order and step numbering do not depend on it) and ``state.skipped_steps`` grows.
        Deciding that costs one host sync per step."""
        t, s = self.config.training, self.strategy
        accumulation = t.gradient_accumulation_steps
        step_loss = torch.zeros((), device=s.device)
        for micro in range(accumulation):
            batch = next(batches)
            input_ids = batch["input_ids"].to(s.device, non_blocking=True)
            labels = batch["labels"].to(s.device, non_blocking=True)
            last_micro = micro == accumulation - 1
            with (contextlib.nullcontext() if last_micro else s.no_sync()), self._autocast():
                loss = state.model(input_ids, labels=labels) / accumulation
            s.backward(state.scaler.scale(loss))
            step_loss += loss.detach()
        state.scaler.unscale_(state.optimizer)
        grad_norm = s.clip_grad_norm(t.clip_grad_norm)
        # Under fp16 a loss scaler (ours, or DeepSpeed's) skips steps whose gradients
        # overflowed and lowers its scale: routine, not divergence, so there only the loss
        # decides. DeepSpeed has stepped already; non-finite weights show in the next loss.
        norm_decides = s.can_skip_step and not state.scaler.is_enabled()
        finite = s.all_finite(step_loss, grad_norm if norm_decides else None)
        if finite or not s.can_skip_step:
            if state.scaler.is_enabled():
                state.scaler.step(state.optimizer)
                state.scaler.update()
                state.optimizer.zero_grad(set_to_none=True)
            else:
                s.optimizer_step()
        else:
            if state.scaler.is_enabled():
                state.scaler.update()
            state.optimizer.zero_grad(set_to_none=True)
            state.skipped_steps += 1
        state.scheduler.step()
        state.step += 1
        state.tokens_seen += self.tokens_per_step
        return StepResult(step_loss, grad_norm, finite)

    # -- the loop's parts -----------------------------------------------------

    @property
    def samples_per_step(self) -> int:
        t = self.config.training
        return t.batch_size * t.gradient_accumulation_steps * self.strategy.world_size

    @property
    def tokens_per_step(self) -> int:
        return self.samples_per_step * self.config.data.seq_len

    def _last_step(self) -> tuple[int, str]:
        """The step training stops after, and why: max_steps or max_tokens, whichever comes first."""
        t = self.config.training
        if t.max_tokens is not None and math.ceil(t.max_tokens / self.tokens_per_step) < t.max_steps:
            return math.ceil(t.max_tokens / self.tokens_per_step), "max_tokens"
        return t.max_steps, "max_steps"

    def _speed_monitor(self) -> SpeedMonitor:
        s = self.strategy
        return SpeedMonitor(
            window_size=50,
            time_unit="hours",
            flops_per_token=flops_per_token(self.llama_config, self.config.data.seq_len),
            world_size=s.world_size,
            warmup_steps=self.config.training.warmup_monitor_steps,
            device=s.device,
        )

    def _logger(self, last_step: int, start_step: int) -> MetricsLogger:
        cfg = self.config
        return MetricsLogger(
            cfg.run_dir,
            enabled=self.strategy.is_main,
            total_steps=last_step,
            start_step=start_step,
            progress_bar=cfg.logging.progress_bar,
            tensorboard=cfg.logging.tensorboard,
            wandb=cfg.logging.wandb,
            wandb_project=cfg.logging.wandb_project,
            run_name=cfg.run_name,
            config=cfg.to_dict(),
        )

    def _on_skipped_step(self, state: TrainState, logger: MetricsLogger, streak: int) -> None:
        """Warns about a skipped (non-finite) step; stops the run when it cannot go on."""
        t = self.config.training
        if self.strategy.can_skip_step and streak < t.max_skipped_steps:
            logger.message(
                f"step {state.step}: loss or gradient norm not finite; optimizer step skipped "
                f"({streak} in a row, the run stops at {t.max_skipped_steps}: training.max_skipped_steps)"
            )
            return
        if self.strategy.can_skip_step:
            why = f"loss or gradient norm not finite for {streak} steps in a row (training.max_skipped_steps)"
        else:
            why = f"loss or gradient norm not finite at step {state.step}, after the {self.strategy.name} engine had stepped"
        self._diverged(why)

    def _preempted(self, state: TrainState, checkpointer: Checkpointer, logger: MetricsLogger, stop: StopRequest) -> None:
        """Saves this step (every rank takes part) and stops with :class:`Preempted`."""
        path = checkpointer.directory / step_dir_name(state.step)
        if not path.is_dir():
            self._save(checkpointer, state, logger)
        if stop.signum is not None:
            signum, name = stop.signum, stop.name
        else:  # the signal reached another rank first
            signum, name = signal.SIGTERM, "a signal to another rank"
        raise Preempted(f"stopped by {name} after step {state.step}, saved in {path}; continue with --resume auto", signum)

    def _diverged(self, why: str) -> None:
        good = latest_checkpoint(self.config.checkpoint_dir)
        advice = "lower training.learning_rate (or raise training.warmup_steps)"
        if good is None:
            then = f"this run has no checkpoint yet: {advice} and start again"
        else:
            then = f"the last good checkpoint is {good}: {advice} and resume from it with --resume auto"
        raise TrainingDiverged(f"training diverged: {why}; stopped without saving; {then}")

    def _log_step(self, state: TrainState, logger: MetricsLogger, monitor: SpeedMonitor, loss: torch.Tensor,
                  grad_norm: torch.Tensor | None) -> None:
        metrics: dict[str, Any] = {"loss": loss.item()}
        if grad_norm is not None:
            metrics["grad_norm"] = grad_norm.item()
        metrics.update({"lr": state.scheduler.get_last_lr()[0], "tokens_seen": state.tokens_seen,
                        "skipped_steps": state.skipped_steps, **monitor.compute()})
        logger.log(state.step, metrics)
        logger.progress(state.step, metrics)

    def _validate(self, state: TrainState, logger: MetricsLogger) -> dict[str, float]:
        assert self.val_loader is not None
        val = self.evaluate(state.model, self.val_loader)
        logger.log(state.step, val)
        logger.message(f"step {state.step}: validation loss {val['val_loss']:.4f}, perplexity {val['val_perplexity']:.2f}")
        return val

    def _check_weights_finite(self, state: TrainState) -> None:
        """No checkpoint or export is ever written from non-finite weights."""
        if not self.strategy.all_finite(*state.model.parameters()):
            self._diverged(f"the weights are not finite at step {state.step}")

    def _save(self, checkpointer: Checkpointer, state: TrainState, logger: MetricsLogger) -> None:
        self._check_weights_finite(state)
        path = checkpointer.save(state, self.config_yaml, dataclasses.asdict(self.llama_config))
        logger.message(f"saved checkpoint {path}")

    def _finish(self, state: TrainState, checkpointer: Checkpointer, logger: MetricsLogger, start_step: int) -> dict[str, Any]:
        """The end of a run: final validation, final checkpoint and Hugging Face export (the
        last two only when this run trained a step)."""
        cfg = self.config
        summary: dict[str, Any] = {"run_dir": str(cfg.run_dir), "start_step": start_step}
        if self.val_loader is not None:
            val = self.evaluate(state.model, self.val_loader)
            logger.log(state.step, val)
            summary.update(val)
        if cfg.checkpoint.save_final and state.step > start_step:
            self._save(checkpointer, state, logger)
        if cfg.checkpoint.export_hf and state.step > start_step:
            self._check_weights_finite(state)
            summary["hf_dir"] = str(self.export_hf(cfg.run_dir / HF_EXPORT_DIR))
            logger.message(f"wrote Hugging Face weights to {summary['hf_dir']}")
        return summary

    # -- after (or outside) the loop ------------------------------------------

    def export_hf(self, directory: Path) -> Path:
        """Writes the model's weights as a Hugging Face checkpoint (every rank calls it;
        the main rank writes). bf16 runs export bf16, others float32; a Hugging Face
        tokenizer named by ``data.tokenizer`` is copied alongside."""
        state = self.strategy.full_state_dict()
        if self.strategy.is_main:
            bf16 = self.config.training.precision in ("bf16-mixed", "bf16-true") or self.precision in ("bf16-mixed", "bf16-true")
            tok = Path(self.config.data.tokenizer)
            save_hf_checkpoint(
                state,
                directory,
                self.llama_config,
                dtype=torch.bfloat16 if bf16 else torch.float32,
                tokenizer_dir=tok if tok.is_dir() else None,
                overwrite=True,  # a resumed run replaces its own earlier export; files Ember did not write still refuse it
            )
        self.strategy.barrier()
        return directory

    def sample(self, prompt: str, max_new_tokens: int = 200) -> str:
        """Text continuing ``prompt`` (byte tokenizer), sampled with a fixed seed. Every rank
        calls it; where the strategy shards the model, the main rank samples from the gathered
        weights and the other ranks return ""."""
        from ember.data.tokenizer import ByteTokenizer

        if self.model is None:
            raise RuntimeError(
                "no trained model to sample from: a distributed train() releases it with the process group "
                "(pass sample_prompt to train(), or load the run's checkpoint or Hugging Face export)"
            )
        model = self.strategy.model_for_generation(lambda: Llama(self.llama_config))
        if model is None:
            return ""
        tok = ByteTokenizer()
        device = self.strategy.device
        ids = torch.tensor([tok.encode(prompt, eos=False)], device=device)
        generator = torch.Generator(device=device).manual_seed(0)
        out = model.generate(ids, max_new_tokens=max_new_tokens, temperature=0.8, top_k=50, generator=generator)
        return tok.decode(out[0].tolist())

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, loader: TokenLoader) -> dict[str, float]:
        """Mean loss and perplexity over the validation set (or its first ``eval_batches`` batches)."""
        limit = self.config.training.eval_batches
        was_training = model.training
        model.eval()
        total = torch.zeros((), device=self.strategy.device)
        n = 0
        loader.reset()
        for i, batch in enumerate(loader):
            if limit is not None and i >= limit:
                break
            with self._autocast():
                total += model(batch["input_ids"].to(self.strategy.device), labels=batch["labels"].to(self.strategy.device))
            n += 1
        model.train(was_training)
        if n == 0:
            raise ValueError(f"the validation data {self.config.data.validation!r} yields no full batch of {self.config.training.batch_size} x {self.config.data.seq_len}")
        loss = self.strategy.reduce_mean(total / n).item()
        return {"val_loss": loss, "val_perplexity": perplexity(loss)}


def _due(every: int | None, step: int, last_step: int) -> bool:
    """Whether a periodic action (every ``every`` steps, None for never) falls on ``step``;
    the last step has its own, final one."""
    return bool(every) and step % every == 0 and step < last_step
