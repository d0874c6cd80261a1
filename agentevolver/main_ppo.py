"""Entry point: `python -m agentevolver.main_ppo --config-name <name> [hydra overrides]`.

Validates the whole config before Ray or any worker starts; a user error exits with code 2 and one
line on stderr (no traceback).
"""
from __future__ import annotations

import os
import sys
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


def run(cfg: DictConfig) -> dict:
    validated(cfg)  # before importing the trainer: its imports (ray, textworld) take seconds
    from agentevolver.module.trainer.ae_ray_trainer import RayTrainer

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
