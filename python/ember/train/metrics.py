"""Where training metrics go: a progress bar, a JSONL file, and TensorBoard or W&B when asked."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


# Measured values that may stop being finite when a run diverges: written as null then.
DIVERGENCE_KEYS = frozenset({"loss", "grad_norm", "val_loss", "val_perplexity"})


class MetricsLogger:
    """Writes one JSON object per logged step to ``<run dir>/metrics.jsonl`` (main rank only)."""

    def __init__(
        self,
        run_dir: Path,
        *,
        enabled: bool,
        total_steps: int,
        start_step: int = 0,
        progress_bar: bool = True,
        tensorboard: bool = False,
        wandb: bool = False,
        wandb_project: str | None = None,
        run_name: str = "run",
        config: dict[str, Any] | None = None,
    ):
        self.enabled = enabled
        self._file = None
        self._bar = None
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(run_dir / METRICS_FILE, "a", encoding="utf-8")
        if progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stderr)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ValueError("logging.tensorboard is true but TensorBoard is not installed (pip install tensorboard)") from e
            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if wandb:
            try:
                import wandb as wandb_mod
            except ImportError as e:
                raise ValueError("logging.wandb is true but wandb is not installed (pip install wandb)") from e
            self._wandb = wandb_mod.init(project=wandb_project or "ember", name=run_name, config=config, resume="allow")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record: dict[str, Any] = {"step": step}
        for key, value in metrics.items():
            if isinstance(value, float) and not math.isfinite(value):
                # A diverged loss is recorded, as null (strict JSON has no NaN or Infinity);
                # other NaNs mean "not measured yet" and are left out, like None.
                if key not in DIVERGENCE_KEYS and math.isnan(value):
                    continue
                value = None
            elif value is None:
                continue
            record[key] = value
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)

    def progress(self, step: int, metrics: dict[str, Any]) -> None:
        if self._bar is None:
            return
        self._bar.n = step
        post = {}
        if metrics.get("loss") is not None:
            post["loss"] = f"{metrics['loss']:.4f}"
        if metrics.get("lr") is not None:
            post["lr"] = f"{metrics['lr']:.2e}"
        if metrics.get("tokens_per_second") is not None:
            post["tok/s"] = f"{metrics['tokens_per_second']:,.0f}"
        self._bar.set_postfix(post, refresh=False)
        self._bar.refresh()

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")
