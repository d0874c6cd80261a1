"""Play of an HF model on one split through the trainer's own validation path (greedy unless the
`val_kwargs` overrides say otherwise), counting where navigation goes wrong.

Same pieces as `RayTrainer._validate` with `alfworld_dapo_tiny` (EnvPool + run_episodes + LLMPolicy in
step mode, nearest-action projection, greedy `val_kwargs`), with the `hf` engine in this process
instead of the worker group. Counts the `go to X` answers whose X is not a receptacle of the room
(the room's receptacles = the `go to` commands admissible at reset): the projection snaps such a
name to the most similar real receptacle, which is how a warm start that does not read the room
ends up alternating between two receptacles. Prints ONE JSON object (last stdout line).

    python scripts/diagnose_play.py MODEL_DIR DATA_DIR [--split valid_seen] [--plays K] [hydra overrides...]

Sampled play, e.g. verl-agent's validation: `--plays 2 actor_rollout_ref.rollout.val_kwargs.temperature=0.4`
(torch seed 0, so a rerun draws the same samples).
"""
from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import ray
import torch
from hydra import compose, initialize_config_dir
from transformers import AutoTokenizer

from agentevolver.alfworld.agent import PolicyOutput, TurnView, parse_action, run_episodes, system_prompt
from agentevolver.alfworld.data import detect_command_wording, list_games
from agentevolver.alfworld.pool import EnvPool
from agentevolver.main_ppo import CONFIG_DIR
from agentevolver.module.agent_flow.llm_policy import LLMPolicy
from agentevolver.workers.rollout.base import SamplingParams
from agentevolver.workers.rollout.hf_rollout import HFRolloutEngine

GO_TO = "go to "


class GoToCounter:
    """Wraps a policy; counts its `go to X` answers and those naming no receptacle of the room."""

    def __init__(self, policy) -> None:
        self.policy, self.rooms = policy, {}
        self.go_to = self.unknown_receptacle = 0

    def act(self, views: list[TurnView]) -> list[PolicyOutput]:
        outputs = self.policy.act(views)
        for view, out in zip(views, outputs):
            if view.step == 0:
                self.rooms[view.episode_id] = {c[len(GO_TO):] for c in view.admissible if c.startswith(GO_TO)}
            action = parse_action(out.text) or ""
            if action.lower().startswith(GO_TO):
                self.go_to += 1
                self.unknown_receptacle += action[len(GO_TO):].strip().lower() not in self.rooms[view.episode_id]
        return outputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("data")
    ap.add_argument("--split", default="valid_seen")
    ap.add_argument("--plays", type=int, default=1, help="episodes per game (success = wins / episodes)")
    ap.add_argument("overrides", nargs="*", help="hydra overrides of alfworld_dapo_tiny")
    args = ap.parse_intermixed_args()  # overrides may follow --plays
    torch.set_num_threads(1)
    torch.manual_seed(0)
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        cfg = compose("alfworld_dapo_tiny", overrides=args.overrides)
    rollout = cfg.actor_rollout_ref.rollout
    games = list_games(args.data, args.split)
    engine = HFRolloutEngine(args.model, rollout, "cpu", torch.float32)
    llm = LLMPolicy(AutoTokenizer.from_pretrained(args.model), engine.generate,
                    SamplingParams.from_rollout_config(rollout, validate=True), cfg.data.max_prompt_length,
                    cfg.data.max_response_length, system=system_prompt(detect_command_wording(games), cfg.env.system_prompt),
                    mode=cfg.env.rollout_mode, history_window=cfg.env.history_window)
    policy = GoToCounter(llm)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    pool = EnvPool(num_workers=cfg.env.pool.num_workers)
    try:
        stats = run_episodes(pool, [(f"{k}_{i:05d}", g) for k in range(args.plays) for i, g in enumerate(games)], policy,
                             max_steps=cfg.env.max_steps, projection=cfg.env.action_projection)
    finally:
        pool.shutdown()
        ray.shutdown()
    wins = sum(s.won for s in stats.values())
    print(json.dumps({"model": args.model, "split": args.split, "games": len(games), "plays": args.plays,
                      "temperature": float(rollout.val_kwargs.temperature), "wins": wins,
                      "success_rate": wins / max(1, len(stats)), "go_to_actions": policy.go_to,
                      "go_to_unknown_receptacle": policy.unknown_receptacle}))


if __name__ == "__main__":
    main()
