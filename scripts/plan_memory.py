"""Print the per-GPU memory plan of a training config as one JSON line.

    python scripts/plan_memory.py --config-name alfworld_dapo_3b [--gpu-memory-gib 80] [hydra overrides]

The model shape comes from model.path's config.json, or from memory_plan.KNOWN_SHAPES by the folder
name (the 3B recipe plans without the weights on this machine). Formulas: agentevolver/utils/memory_plan.py.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> dict:
    from hydra import compose, initialize_config_dir

    from agentevolver.utils.memory_plan import plan_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-name", default="alfworld_dapo_3b")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0)
    args, overrides = parser.parse_known_args(argv)
    with initialize_config_dir(config_dir=str(REPO / "config"), version_base=None):
        cfg = compose(config_name=args.config_name, overrides=overrides)
    out = plan_config(cfg, args.gpu_memory_gib)
    out.pop("phases_bytes")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
