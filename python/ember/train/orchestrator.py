"""``PretrainingOrchestrator``: one training run from a :class:`~ember.config.Config`.

The loop reads top to bottom: set up, build, (resume), then per step: micro-batches
forward and backward, clip, step, monitor, log, validate, checkpoint. Everything
that differs between single-device, DDP, FSDP and DeepSpeed runs sits behind the
strategy interface (``ember.distributed.base.Strategy``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from ember.config import Config, parse_duration
from ember.data import TokenLoader, check_vocabulary
from ember.data.builtin import STDLIB, stdlib_shards
from ember.distributed import make_strategy
from ember.model import Llama, LlamaConfig, apply_activation_checkpointing
from ember.model.config import flops_per_token
from ember.model.hf import save_hf_checkpoint, weights_loader
from ember.train.checkpoint import Checkpointer, latest_checkpoint, list_checkpoints
from ember.train.metrics import MetricsLogger, perplexity
from ember.train.optim import build_optimizer
from ember.train.schedule import build_scheduler
from ember.train.speed_monitor import SpeedMonitor

RESOLVED_CONFIG = "config.yaml"
HF_EXPORT_DIR = "hf"


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class PretrainingOrchestrator:
    """Trains the model a config describes; ``train()`` returns a summary dict."""

    def __init__(self, config: Config, *, resume: str | None = None):
        self.config = config
        self.resume = resume if resume is not None else config.checkpoint.resume
        self.strategy = make_strategy(config)
        self.model: torch.nn.Module | None = None  # the trained model, after a single-strategy train()

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

    def _data_paths(self) -> tuple[Any, Any]:
        d = self.config.data
        if d.prepare.inputs:
            # Tokenize once, on the main rank, before any rank opens the shards.
            from ember.data.prepare import prepared_data_paths

            with self.strategy.main_first():
                train, val = prepared_data_paths(d, progress=self.config.logging.progress_bar and self.strategy.is_main)
        else:
            train, val = d.train, d.validation
        if train == STDLIB or val == STDLIB:
            with self.strategy.main_first():
                std_train, std_val = stdlib_shards(d.cache_dir)
            if train == STDLIB:
                train = str(std_train)
                val = str(std_val) if val is None else val
            if val == STDLIB:
                val = str(std_val)
        return train, val

    def _loaders(self) -> tuple[TokenLoader, TokenLoader | None]:
        d, t, s = self.config.data, self.config.training, self.strategy
        train_paths, val_paths = self._data_paths()
        common = dict(
            seq_len=d.seq_len,
            batch_size=t.batch_size,
            rank=s.rank,
            world_size=s.world_size,
            num_threads=d.num_threads,
            prefetch=d.prefetch,
            pin_memory=s.device.type == "cuda",
        )
        check_vocabulary(train_paths, self.llama_config.vocab_size, "data.train")
        if val_paths:
            check_vocabulary(val_paths, self.llama_config.vocab_size, "data.validation")
        train = TokenLoader(train_paths, seed=t.seed, shuffle=True, **common)
        val = TokenLoader(val_paths, shuffle=False, **common) if val_paths else None
        return train, val

    def _build_model(self) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        t = self.config.training
        with torch.device("meta"):
            model = Llama(self.llama_config)
        if self.config.model.activation_checkpointing != "none":
            apply_activation_checkpointing(model, self.config.model.activation_checkpointing)
        if self.config.model.compile:
            # Block by block, in place: parameter names (and so checkpoints) stay as they are,
            # and a sharding wrapper applied after sees ordinary modules.
            for block in model.layers:
                block.compile()
        if self.precision == "bf16-true":
            model.to(torch.bfloat16)

        def make_optimizer(m: torch.nn.Module) -> torch.optim.Optimizer:
            return build_optimizer(m, lr=t.learning_rate, weight_decay=t.weight_decay, betas=t.betas, eps=t.eps)

        def init_weights(m: torch.nn.Module) -> None:
            m.init_weights(seed=t.seed)

        if self.config.model.init_from is not None:
            # Continual pretraining: each rank reads its own shards of the checkpoint.
            init_weights = weights_loader(self.config.model.init_from)  # noqa: F811

        model, optimizer = self.strategy.prepare(model, make_optimizer, init_weights)
        return model, optimizer

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
            return latest_checkpoint(ckpt_dir)
        path = Path(self.resume)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: checkpoint to resume from not found")
        return path

    def train(self, *, sample_prompt: str | None = None) -> dict[str, Any]:
        """Runs training to the end and returns a summary. With ``sample_prompt`` and the
        byte tokenizer, the summary also holds ``sample``: text the trained model writes."""
        s = self.strategy
        s.setup()
        finished = False
        try:
            summary = self._train()
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
            )
        self.strategy.barrier()
        return directory

    def sample(self, prompt: str, max_new_tokens: int = 200) -> str:
        """Text continuing ``prompt`` (byte tokenizer), sampled with a fixed seed. Every rank calls it."""
        from ember.data.tokenizer import ByteTokenizer

        if self.model is None:
            raise RuntimeError(
                "no trained model to sample from: a distributed train() releases it with the process group "
                "(pass sample_prompt to train(), or load the run's checkpoint or Hugging Face export)"
            )
        tok = ByteTokenizer()
        device = self.strategy.device
        ids = torch.tensor([tok.encode(prompt, eos=False)], device=device)
        generator = torch.Generator(device=device).manual_seed(0)
        model = self.strategy.unwrap(self.model)
        out = model.generate(ids, max_new_tokens=max_new_tokens, temperature=0.8, top_k=50, generator=generator)
        return tok.decode(out[0].tolist())

    def _train(self) -> dict[str, Any]:
        cfg, t, s = self.config, self.config.training, self.strategy
        torch.manual_seed(t.seed)
        random.seed(t.seed)
        self.llama_config: LlamaConfig = cfg.model.llama_config()
        self.precision = self._precision()
        resume_from = self._resume_point()
        run_dir = cfg.run_dir
        # The saved config names its run, so `ember train runs/x/config.yaml --resume auto` continues it.
        saved = cfg.to_dict()
        saved["logging"]["run_name"] = cfg.run_name
        config_yaml = yaml.safe_dump(saved, sort_keys=False)
        if s.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / RESOLVED_CONFIG).write_text(config_yaml)

        train_loader, val_loader = self._loaders()
        model, optimizer = self._build_model()
        scheduler = build_scheduler(
            optimizer,
            warmup_steps=t.warmup_steps,
            max_steps=t.max_steps,
            schedule=t.lr_scheduler,
            min_lr_ratio=t.min_lr_ratio,
        )
        scaler = torch.amp.GradScaler(s.device.type, enabled=self.precision == "fp16-mixed")
        checkpointer = Checkpointer(cfg.checkpoint_dir, s, cfg.checkpoint.keep_last)

        step, tokens_seen = 0, 0
        if resume_from is not None:
            extra = checkpointer.load(resume_from)
            step, tokens_seen = extra["step"], extra["tokens_seen"]
            scheduler.load_state_dict(extra["scheduler"])
            train_loader.load_state_dict(extra["loader"])
            scaler.load_state_dict(extra["scaler"])
            _set_rng_state(extra["rng"])

        samples_per_step = t.batch_size * t.gradient_accumulation_steps * s.world_size
        tokens_per_step = samples_per_step * cfg.data.seq_len
        last_step = t.max_steps
        if t.max_tokens is not None:
            last_step = min(last_step, math.ceil(t.max_tokens / tokens_per_step))
        deadline = None if t.time_budget is None else time.monotonic() + parse_duration(t.time_budget)

        monitor = SpeedMonitor(
            window_size=50,
            time_unit="hours",
            flops_per_token=flops_per_token(self.llama_config, cfg.data.seq_len),
            world_size=s.world_size,
            warmup_steps=t.warmup_monitor_steps,
            device=s.device,
        )
        logger = MetricsLogger(
            run_dir,
            enabled=s.is_main,
            total_steps=last_step,
            start_step=step,
            progress_bar=cfg.logging.progress_bar,
            tensorboard=cfg.logging.tensorboard,
            wandb=cfg.logging.wandb,
            wandb_project=cfg.logging.wandb_project,
            run_name=cfg.run_name,
            config=cfg.to_dict(),
        )
        if resume_from is not None:
            logger.message(f"resumed from {resume_from} at step {step}")

        def save(at_step: int) -> None:
            extra = {
                "step": at_step,
                "tokens_seen": tokens_seen,
                "scheduler": scheduler.state_dict(),
                "loader": train_loader.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": _rng_state(),
            }
            path = checkpointer.save(at_step, extra, config_yaml, dataclasses.asdict(self.llama_config))
            logger.message(f"saved checkpoint {path}")

        summary: dict[str, Any] = {"run_dir": str(run_dir), "start_step": step}
        train_iter = iter(train_loader)
        model.train()
        loss_sum = torch.zeros((), device=s.device)
        loss_count = 0
        stopped_by = "max_steps" if last_step == t.max_steps else "max_tokens"
        try:
            while step < last_step:
                for micro in range(t.gradient_accumulation_steps):
                    batch = next(train_iter)
                    input_ids = batch["input_ids"].to(s.device, non_blocking=True)
                    labels = batch["labels"].to(s.device, non_blocking=True)
                    last_micro = micro == t.gradient_accumulation_steps - 1
                    with (contextlib.nullcontext() if last_micro else s.no_sync()), self._autocast():
                        loss = model(input_ids, labels=labels) / t.gradient_accumulation_steps
                    s.backward(scaler.scale(loss))
                    loss_sum += loss.detach()
                scaler.unscale_(optimizer)
                grad_norm = s.clip_grad_norm(t.clip_grad_norm)
                if scaler.is_enabled():
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                else:
                    s.optimizer_step()
                scheduler.step()
                step += 1
                tokens_seen += tokens_per_step
                loss_count += 1
                monitor.update(samples=samples_per_step, tokens=tokens_per_step)

                if step % cfg.logging.log_every == 0 or step == last_step:
                    metrics = {
                        "loss": s.reduce_mean(loss_sum / loss_count).item(),
                        "grad_norm": grad_norm.item(),
                        "lr": scheduler.get_last_lr()[0],
                        "tokens_seen": tokens_seen,
                        **monitor.compute(),
                    }
                    loss_sum.zero_()
                    loss_count = 0
                    logger.log(step, metrics)
                    logger.progress(step, metrics)
                    if deadline is not None and s.broadcast_flag(time.monotonic() > deadline):
                        stopped_by = "time_budget"
                        break
                if val_loader is not None and t.eval_every and step % t.eval_every == 0 and step < last_step:
                    val = self.evaluate(model, val_loader)
                    logger.log(step, val)
                    logger.message(f"step {step}: validation loss {val['val_loss']:.4f}, perplexity {val['val_perplexity']:.2f}")
                if cfg.checkpoint.every_n_steps and step % cfg.checkpoint.every_n_steps == 0 and step < last_step:
                    save(step)

            if val_loader is not None:
                val = self.evaluate(model, val_loader)
                logger.log(step, val)
                summary.update(val)
            if cfg.checkpoint.save_final and step > summary["start_step"]:
                save(step)
            if cfg.checkpoint.export_hf and step > summary["start_step"]:
                summary["hf_dir"] = str(self.export_hf(run_dir / HF_EXPORT_DIR))
                logger.message(f"wrote Hugging Face weights to {summary['hf_dir']}")
        finally:
            logger.close()
        summary.update({"steps": step, "tokens_seen": tokens_seen, "stopped_by": stopped_by})
        self.model = model
        return summary

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
