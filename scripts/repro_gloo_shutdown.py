"""Loop the end of a 2-rank gloo spawn (init, one update, shutdown) and count abnormal exits.

    python scripts/repro_gloo_shutdown.py --runs 50 [--update]

Issue 14 item 8: an intermittent SIGABRT at the end of a 2-rank spawn in tests/workers/test_actor_fsdp.py.
Each run is one torch.multiprocessing spawn, exactly as the test's run_ranks.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from agentevolver.utils.dist import free_port
from tests.helpers import make_batch, make_config, make_tiny_model


def _target(rank: int, world: int, port: int, cfg, update: bool) -> None:
    import torch

    torch.set_num_threads(1)
    from agentevolver.workers.fsdp_worker import ActorRolloutRefWorker

    w = ActorRolloutRefWorker(cfg, rank, world, "127.0.0.1", port, enable_rollout=False)
    w.init_model()
    if update:
        w.update_actor(make_batch(4).chunk(world)[rank])
    w.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--update", action="store_true")
    args = ap.parse_args()
    model = make_tiny_model(Path(tempfile.mkdtemp()) / "m")
    cfg = make_config(model)
    failures: list[str] = []
    t0 = time.time()
    for i in range(args.runs):
        try:
            mp.spawn(_target, args=(2, free_port(), cfg, args.update), nprocs=2, join=True)
        except (mp.ProcessExitedException, mp.ProcessRaisedException) as e:
            lines = [ln for ln in str(e).splitlines() if ln.strip()]  # the child's traceback: keep its last line
            failures.append(f"run {i}: {type(e).__name__}: {lines[-1] if lines else ''}")
            print(failures[-1], flush=True)
    print(f"{args.runs} runs, {len(failures)} abnormal exits, {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
