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


class UserError(Exception):
    """Raised for problems a user can fix; main() prints its one line and exits 2."""


def run(cfg: DictConfig) -> dict:
    from agentevolver.alfworld.data import AlfworldDataError
    from agentevolver.module.trainer.config_check import ConfigError, validate_config

    try:
        validate_config(cfg)
    except (ConfigError, AlfworldDataError) as e:
        raise UserError(str(e)) from None
    from agentevolver.module.trainer.ae_ray_trainer import RayTrainer

    trainer = RayTrainer(cfg)
    try:
        return trainer.fit()
    finally:
        trainer.shutdown()


@hydra.main(config_path=CONFIG_DIR, config_name="alfworld_dapo_tiny", version_base=None)
def _hydra_main(cfg: DictConfig) -> None:
    # Handled here: hydra reports any Exception escaping the task with a traceback and exit 1.
    try:
        run(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _hydra_main()


if __name__ == "__main__":
    main()
