"""Entry point: `python -m agentevolver.main_ppo --config-name <name> [hydra overrides]`.

Validates the whole config before Ray or any worker starts; a user error exits with code 2 and one
line on stderr (no traceback).
"""
from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import hydra
from omegaconf import DictConfig

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "config")


def validated(cfg: DictConfig) -> DictConfig:
    """Validate once, before Ray or any worker starts; a user error exits 2 with one line."""
    from agentevolver.alfworld.data import AlfworldDataError
    from agentevolver.module.trainer.config_check import ConfigError, validate_config

    try:
        validate_config(cfg)
    except (ConfigError, AlfworldDataError) as e:
        # Exit here: hydra reports any Exception escaping the task with a traceback and exit 1.
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    return cfg


@contextlib.contextmanager
def output_dir_locked(cfg: DictConfig) -> Iterator[None]:
    """Hold trainer.default_local_dir for the life of the run; a second run there exits 2 with one line."""
    from agentevolver.module.trainer.run_lock import RunLock, RunLockError

    lock = RunLock(cfg.trainer.default_local_dir)
    try:
        note = lock.acquire()
    except RunLockError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if note:
        print(note, flush=True)
    try:
        yield
    finally:
        lock.release()


def run(cfg: DictConfig) -> dict:
    validated(cfg)  # before importing the trainer: its imports (ray, textworld) take seconds
    from agentevolver.module.trainer.ae_ray_trainer import RayTrainer

    with output_dir_locked(cfg):
        trainer = RayTrainer(cfg)
        try:
            return trainer.fit()
        finally:
            trainer.shutdown()


@hydra.main(config_path=CONFIG_DIR, config_name="alfworld_dapo_tiny", version_base=None)
def _hydra_main(cfg: DictConfig) -> None:
    run(cfg)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _hydra_main()


if __name__ == "__main__":
    main()
