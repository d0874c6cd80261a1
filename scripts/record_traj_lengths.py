"""Record the row lengths of trajectory-mode ALFWorld rollouts (for scripts/benchmark_actor.py).

    python scripts/record_traj_lengths.py [--games 60] [--out scripts/data/alfworld_traj_lengths.json]

Plays real games (the shared valid_train split) through the real engine pool and the RL rollout's own
token path (LLMPolicy, trajectory mode, the project's tiny ALFWorld tokenizer, the 3B recipe's 4 096 /
16 384 budgets, 30 env steps): half the episodes are teacher-forced by the planner with 0..3 detours
(what a trained policy plays), half by a uniform-random admissible action (what an untrained policy
does: it runs to max_steps). Writes [prompt_len, response_len, model_tokens] per row.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    import ray
    from transformers import AutoTokenizer

    from agentevolver.alfworld.agent import run_episodes
    from agentevolver.alfworld.data import list_games
    from agentevolver.alfworld.play import WalkthroughPolicy
    from agentevolver.alfworld.pool import EnvPool
    from agentevolver.models.build_tiny import build_tiny_model
    from agentevolver.module.agent_flow.llm_policy import LLMPolicy
    from agentevolver.workers.rollout.base import SamplingParams

    ap = argparse.ArgumentParser()
    ap.add_argument("--games", type=int, default=60)
    ap.add_argument("--data-dir", default="/work/shared/alfworld")
    ap.add_argument("--out", default=str(REPO / "scripts" / "data" / "alfworld_traj_lengths.json"))
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(build_tiny_model(Path(tempfile.mkdtemp()) / "tiny"))
    games = list_games(args.data_dir, "valid_train")[: args.games]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    pool = EnvPool(num_workers=2)
    rng = random.Random(0)
    experts = {d: WalkthroughPolicy(seed=d, max_detours=d) for d in range(4)}

    def teacher(view):
        if view.episode_id.startswith("rand"):
            return f"<think>try something</think><action>{rng.choice(view.admissible)}</action>"
        return f"<action>{experts[int(view.episode_id.split('-')[1]) % 4].action(view)}</action>"

    rows = []
    try:
        for kind in ("expert", "rand"):
            policy = LLMPolicy(tok, None, SamplingParams(), 4096, 16384, teacher=teacher, mode="trajectory")
            episodes = [(f"{kind}-{i}", g) for i, g in enumerate(games)]
            stats = run_episodes(pool, episodes, policy, max_steps=30)
            for eid, _ in episodes:
                t = policy.trajectory(eid)
                rows.append([len(t.prompt_ids), len(t.response_ids), int(sum(t.response_mask))])
            won = sum(s.won for s in stats.values()) / len(stats)
            print(f"{kind}: {len(episodes)} episodes, won {won:.2f}")
    finally:
        ray.shutdown()
    resp = [r[1] for r in rows]
    meta = {"source": "valid_train games, LLMPolicy trajectory mode, tiny ALFWorld tokenizer; "
                      "half planner(+0..3 detours), half random admissible; max_steps 30",
            "rows": len(rows), "response_mean": sum(resp) / len(resp), "response_max": max(resp)}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}) + "\n")
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
