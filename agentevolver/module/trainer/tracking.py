"""Metric sinks selected by `trainer.logger`: console, file (metrics.jsonl), wandb; the phase timer."""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

LOGGERS = ("console", "file", "wandb")  # trainer.logger: the sinks below


@contextlib.contextmanager
def timer(name: str, timings: dict[str, float]):
    """Adds the block's wall seconds to timings[name] (the `timing/<name>` metrics)."""
    t0 = time.perf_counter()
    yield
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # keep jsonl strictly valid JSON
    return value


class Tracking:
    """Fan metrics out to the configured sinks. `log` takes flat `phase/name` keys."""

    def __init__(self, cfg: DictConfig, out_dir: Path, wandb_run_id: str | None = None) -> None:
        loggers = cfg.trainer.logger
        self.loggers = [loggers] if isinstance(loggers, str) else list(loggers)
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.wandb_run = None
        self.wandb_run_id = wandb_run_id
        if "wandb" in self.loggers:
            self._init_wandb(cfg, wandb_run_id)

    def _init_wandb(self, cfg: DictConfig, run_id: str | None) -> None:
        import wandb

        # Offline unless the user configured wandb (a key or an explicit mode): no network by default.
        if "WANDB_MODE" not in os.environ and "WANDB_API_KEY" not in os.environ:
            os.environ["WANDB_MODE"] = "offline"
        self.wandb_run_id = run_id or uuid.uuid4().hex[:12]  # kept in checkpoints: resume continues the run
        self.wandb_run = wandb.init(
            project=cfg.trainer.project_name, name=cfg.trainer.experiment_name, id=self.wandb_run_id,
            resume="allow", dir=str(self.out_dir), config=OmegaConf.to_container(cfg, resolve=True),
        )

    def log(self, metrics: dict[str, Any], step: int) -> None:
        row = {"step": step} | {k: _plain(v) for k, v in sorted(metrics.items())}
        if "file" in self.loggers:
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in row.items() if k != "step"}, step=step)
        if "console" in self.loggers:
            print(format_console(row), flush=True)

    def finish(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


CONSOLE_KEYS = ("train/success_rate", "val/success_rate", "actor/pg_loss", "actor/entropy", "actor/grad_norm",
                "response_length/mean", "dynamic_sampling/kept_groups", "rollout/probs_diff_mean", "timing/step")


def format_console(row: dict[str, Any]) -> str:
    parts = [f"step {row['step']}"]
    for key in CONSOLE_KEYS:
        if key in row and isinstance(row[key], (int, float)):
            parts.append(f"{key}={row[key]:.4g}")
    return " | ".join(parts)
