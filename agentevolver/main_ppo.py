"""Entry point: `python -m agentevolver.main_ppo --config-name <name> [hydra overrides]`.

Validates the whole config before Ray or any worker starts; a user error exits with code 2 and one
line on stderr (no traceback).
"""
from __future__ import annotations

import contextlib
import os
import signal
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


def stop(trainer, cfg: DictConfig, code: int, what: str) -> None:
    """Clean up (workers, env pool, Ray), then exit `code` with one line: what happened, whether a
    checkpoint is usable and how to resume."""
    import ray

    from agentevolver.module.trainer.checkpoint_manager import CheckpointManager

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):  # ends the progress line, so the message has its own
        bar.close()
    if trainer is not None:
        trainer.shutdown()
    ray.shutdown()
    hint = CheckpointManager(cfg.trainer.default_local_dir, cfg.trainer.max_ckpt_to_keep).resume_hint()
    print(f"{what}; {hint}", file=sys.stderr, flush=True)
    sys.exit(code)


def run(cfg: DictConfig) -> dict:
    validated(cfg)  # before importing the trainer: its imports (ray, textworld) take seconds
    from agentevolver.module.trainer.ae_ray_trainer import RayTrainer
    from agentevolver.workers.worker_group import WorkerDiedError

    with output_dir_locked(cfg):
        trainer = None
        try:
            trainer = RayTrainer(cfg)
            return trainer.fit()
        except KeyboardInterrupt:
            where = f"in training step {trainer.global_step + 1}" if trainer is not None else "during start-up"
            stop(trainer, cfg, 130, f"interrupted (SIGINT) {where}")
        except WorkerDiedError as e:
            stop(trainer, cfg, 1, f"error: {e}")
        finally:
            if trainer is not None:
                trainer.shutdown()


@hydra.main(config_path=CONFIG_DIR, config_name="alfworld_dapo_tiny", version_base=None)
def _hydra_main(cfg: DictConfig) -> None:
    run(cfg)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _hydra_main()


if __name__ == "__main__":
    main()
