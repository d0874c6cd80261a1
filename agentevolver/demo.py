"""`make demo`: the CPU demo from a tiny offline model to a measured DAPO result.

    python -m agentevolver.demo --out outputs/demo --seed 1

1. build the tiny Qwen2 model + tokenizer (if absent)             models/tiny-qwen2
2. generate training games and a held-out set (other seeds)        <out>/data/json_2.1.1/{train,valid_seen}
3. warm start: SFT on the planner walkthroughs (actor worker)      python -m agentevolver.sft
4. DAPO (alfworld_dapo_tiny, token-mean), validating on held-out   python -m agentevolver.main_ppo
5. summary.json + learning_curve.png in <out>
Every number written comes from the runs' own metrics.jsonl.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = REPO / "models" / "tiny-qwen2"


def sh(*args: str) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run(args, check=True, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE=os.environ.get(
        "WANDB_MODE", "offline")))


class PeakMemory:
    """Peak total RSS of this process and all its descendants (Ray, workers, env actors), sampled."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True)
        self._thread.start()

    def _run(self, interval_s: float) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.wait(interval_s):
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += proc.memory_info().rss
            self.peak_mb = max(self.peak_mb, total / 2**20)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return round(self.peak_mb, 1)


# The ablation rows of the README (issue 16), each adding one mechanism to the row before it.
# Every row runs in bypass_mode: the hf engine samples in fp32 with the actor's own weights, so its log-probs are
# the actor's to ~1e-6 (rollout/probs_diff_mean, tests/module/trainer/test_trainer_e2e.py) and the old-log-prob
# pass only matters on exp_mask rows, the only ones it then runs on.
PRESETS: dict[str, list[str]] = {"fixed": ["algorithm.rollout_correction.bypass_mode=true"]}
PRESETS["fresh"] = PRESETS["fixed"] + ["data.task_source=generated"]
PRESETS["curriculum"] = PRESETS["fresh"] + ["data.task_gen.curriculum=success_pq"]
PRESETS["guided"] = PRESETS["curriculum"] + ["exp_manager.train_rollout_expmode=mixed",
                                             "exp_manager.init_experience_before_training=true",
                                             "actor_rollout_ref.actor.off_cliprange_high=0.4"]
# fresh games never repeat, so a success of the same task TYPE stands in for a failed rollout
PRESETS["replay"] = PRESETS["guided"] + ["exp_manager.replay.enable=true", "exp_manager.replay.match=task_type"]
# off-policy guidance on fresh games (a branch from `fresh`, not from `replay`): a group with at most one
# win of 4 gets the explore teacher's episode of that very game in place of a failure
PRESETS["teacher"] = PRESETS["fresh"] + ["exp_manager.replay.enable=true", "exp_manager.replay.teacher=explore",
                                         "actor_rollout_ref.actor.off_cliprange_high=0.4"]
# the teacher's guidance on a curriculum's games: fresh games drawn where recent success is mid-range (p(1 - p)),
# so more groups hold both wins and losses and the teacher's episode lands where the model half-knows the task
PRESETS["teacher_curriculum"] = PRESETS["teacher"] + ["data.task_gen.curriculum=success_pq"]
# self-imitation: the teacher's tokens also get an unclipped NLL term (actor.imitation_coef)
PRESETS["teacher_sil"] = PRESETS["teacher"] + ["actor_rollout_ref.actor.imitation_coef=1.0"]
# more guidance: two teacher episodes for each group with at most two wins of 4
PRESETS["teacher_k2"] = PRESETS["teacher"] + ["exp_manager.replay.max_replay_per_group=2",
                                              "exp_manager.replay.success_threshold=0.75"]
# expert relabelling (DAgger, a branch from `fresh`): every failed episode also trains on the state-aware
# expert's command in each state the policy reached (exp_mask = 1, scored as a success)
PRESETS["dagger"] = PRESETS["fresh"] + ["exp_manager.dagger.enable=true", "actor_rollout_ref.actor.off_cliprange_high=0.4"]
# reward shaping on the fixed games: each turn whose command is not admissible (snapped by nearest projection or
# not) costs 0.05, so a group's better rollouts are also the ones that read the room
PRESETS["inadmissible"] = PRESETS["fixed"] + ["env.reward.inadmissible_penalty=0.05"]
BOOTSTRAP_RESAMPLES = 10_000


def paired_bootstrap(before: list[float], after: list[float], seed: int = 0) -> tuple[float, float, float]:
    """(mean gain, 2.5 %, 97.5 % percentile) of mean(after_i − before_i) over games resampled with
    replacement (the same games at both ends: a paired bootstrap)."""
    import numpy as np

    d = np.asarray(after, dtype=float) - np.asarray(before, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(d), size=(BOOTSTRAP_RESAMPLES, len(d)))
    means = d[idx].mean(axis=1)
    return float(d.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def _problems(folder: Path) -> set[str]:
    """problem_key of every game below folder."""
    from agentevolver.alfworld.data import GAME_FILE, problem_keys

    return problem_keys(folder.rglob(GAME_FILE))


def heldout_overlap(data: Path, dapo_dir: Path) -> int:
    """Held-out games whose problem also occurs among the games trained on: the train split (the SFT warm
    start's games, and DAPO's with fixed tasks) and the generated ones. Both generators exclude them: 0."""
    held = _problems(data / "json_2.1.1" / "valid_seen")
    train = _problems(data / "json_2.1.1" / "train") | _problems(dapo_dir / "generated_tasks")
    return len(held & train)


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def per_type(row: dict, prefix: str) -> dict[str, float]:
    return {k[len(prefix) + 1:]: v for k, v in row.items() if k.startswith(prefix + "/")}


def plot_curve(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in rows:
        for k, v in r.items():
            if k.startswith(("train/success_rate", "val/success_rate")) and isinstance(v, (int, float)):
                series[k].append((r["step"], v))
    for ax, prefix, title in ((axes[0], "train/", "train rollouts"), (axes[1], "val/", "held-out (greedy)")):
        for k, pts in sorted(series.items()):
            if not k.startswith(prefix):
                continue
            xs, ys = zip(*pts)
            overall = k == prefix + "success_rate"
            ax.plot(xs, ys, marker="o", lw=2.5 if overall else 1, alpha=1 if overall else 0.6,
                    label="all tasks" if overall else k.split("/")[-1])
        ax.set_title(f"success rate — {title}")
        ax.set_xlabel("DAPO step")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="outputs/demo")
    ap.add_argument("--seed", type=int, default=1)
    # Game difficulty for a 1 M-param model on 2 cores: 3-4 receptacles, no distractors, nothing closed
    # (with 8 receptacles and closed containers the warm-started model won 0 of 18 held-out games).
    ap.add_argument("--train-games", type=int, default=128)
    ap.add_argument("--heldout-games", type=int, default=120, help="20 per task type (the generator balances types)")
    ap.add_argument("--min-receptacles", type=int, default=3)
    ap.add_argument("--max-receptacles", type=int, default=4)
    ap.add_argument("--distractors", default="0", help="N or LO,HI distractor objects per game")
    ap.add_argument("--closed-fraction", type=float, default=0.0)
    ap.add_argument("--sft-epochs", type=int, default=None, help="default: the config's sft.epochs")
    ap.add_argument("--steps", type=int, default=30, help="DAPO steps (the ablation rows: 20)")
    ap.add_argument("--test-freq", type=int, default=10, help="held-out evaluations (120 games each) every N steps")
    ap.add_argument("--preset", choices=list(PRESETS), default="teacher_curriculum",
                    help="ablation row: fixed games | + fresh generated tasks | + curriculum | + experience-guided "
                         "rollouts | + replay of successes (each adds to the one before) | teacher: fresh + the "
                         "teacher's episode of the same game replayed into failing groups | teacher_curriculum: teacher + "
                         "curriculum (make demo's)")
    ap.add_argument("--warm-start", default=None, metavar="DEMO_OUT",
                    help="reuse another demo's games and warm start (its data/ and sft/hf_actor): the ablation rows "
                         "then start from the same model")
    ap.add_argument("overrides", nargs="*", help="extra hydra overrides for the DAPO run")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    shared = Path(args.warm_start).resolve() if args.warm_start else out
    if args.warm_start and not (shared / "sft" / "hf_actor" / "config.json").is_file():
        print(f"error: --warm-start {shared}: no sft/hf_actor/config.json there (run the demo into it first)", file=sys.stderr)
        return 2
    data = shared / "data"
    t0 = time.time()
    memory = PeakMemory()
    py = sys.executable

    if not (TINY_MODEL / "config.json").is_file():
        sh(py, "-m", "agentevolver.models.build_tiny", "--out", str(TINY_MODEL))
    if not (data / "json_2.1.1" / "train").is_dir():
        knobs = ["--min-receptacles", str(args.min_receptacles), "--max-receptacles", str(args.max_receptacles),
                 "--distractors", args.distractors, "--closed-fraction", str(args.closed_fraction)]
        # held-out first: the training split is then made without any held-out game's problem
        sh(py, "-m", "agentevolver.alfworld", "generate", "--out", str(data), "--num-games",
           str(args.heldout_games), "--seed", str(1000 * args.seed + 500), "--split", "valid_seen", *knobs)
        sh(py, "-m", "agentevolver.alfworld", "generate", "--out", str(data), "--num-games", str(args.train_games),
           "--seed", str(1000 * args.seed), "--split", "train", "--exclude", str(data / "json_2.1.1" / "valid_seen"),
           *knobs)
    common = [f"env.alfworld.data_dir={data}", f"trainer.seed={args.seed}", f"data.seed={args.seed}",
              "trainer.resume_mode=disable"]
    sft_dir = shared / "sft"
    sft = [py, "-m", "agentevolver.sft", "--config-name", "alfworld_dapo_tiny", *common,
           f"actor_rollout_ref.model.path={TINY_MODEL}", f"trainer.default_local_dir={sft_dir}",
           f"hydra.run.dir={out / 'hydra' / 'sft'}"]
    if args.sft_epochs is not None:
        sft.append(f"sft.epochs={args.sft_epochs}")
    if not args.warm_start:
        sh(*sft)
    dapo_dir = out / "dapo"
    (dapo_dir / "metrics.jsonl").unlink(missing_ok=True)
    (dapo_dir / "val_games.jsonl").unlink(missing_ok=True)
    levels = ",".join(f"[{r},{r}]" for r in range(args.min_receptacles, args.max_receptacles + 1))
    lo, _, hi = args.distractors.partition(",")
    task_gen = [f"data.task_gen.receptacles=[{levels}]", f"data.task_gen.distractors=[[{lo},{hi or lo}]]",
                f"data.task_gen.closed_fraction=[{args.closed_fraction}]"]  # fresh games as hard as the split
    dapo = [py, "-m", "agentevolver.main_ppo", "--config-name", "alfworld_dapo_tiny", *common,
            f"actor_rollout_ref.model.path={sft_dir / 'hf_actor'}", f"trainer.default_local_dir={dapo_dir}",
            "trainer.val_before_train=true", "trainer.logger=[console,file]", f"hydra.run.dir={out / 'hydra' / 'dapo'}",
            f"trainer.total_training_steps={args.steps}", f"trainer.test_freq={args.test_freq}",
            f"trainer.save_freq={args.steps}", *task_gen, *PRESETS[args.preset], *args.overrides]
    sh(*dapo)

    rows = read_metrics(dapo_dir / "metrics.jsonl")
    val_rows = [r for r in rows if "val/success_rate" in r]
    before, after = val_rows[0], val_rows[-1]
    games = [json.loads(line) for line in (dapo_dir / "val_games.jsonl").read_text().splitlines() if line.strip()]
    g0, g1 = games[0]["won"], games[-1]["won"]
    ids = sorted(g0)
    gain, lo95, hi95 = paired_bootstrap([g0[i] for i in ids], [g1[i] for i in ids])
    summary = {
        "seed": args.seed,
        "preset": args.preset,
        "warm_start_success_rate": before["val/success_rate"],
        "dapo_success_rate": after["val/success_rate"],
        "gain": after["val/success_rate"] - before["val/success_rate"],
        "gain_ci95": [round(lo95, 4), round(hi95, 4)],
        "gain_ci_method": f"paired bootstrap over the {len(ids)} held-out games ({BOOTSTRAP_RESAMPLES} resamples, "
                          "percentile interval), first vs last evaluation",
        "gain_per_game_mean": round(gain, 4),
        "heldout_games_also_in_training": heldout_overlap(data, dapo_dir),
        "warm_start_per_task_type": per_type(before, "val/success_rate"),
        "dapo_per_task_type": per_type(after, "val/success_rate"),
        "heldout_curve": [[r["step"], r["val/success_rate"]] for r in val_rows],  # every evaluation, not a pick
        "steps": max(r["step"] for r in rows),
        "heldout_games": len(ids),
        "train_games": args.train_games,
        "wall_time_s": round(time.time() - t0, 1),
        "peak_rss_mb": memory.stop(),
        "trainer_overhead_frac_mean": round(sum(r.get("timing/overhead_frac", 0) for r in rows if r["step"] > 0)
                                            / max(1, sum(1 for r in rows if r["step"] > 0)), 4),
        "warm_start_from": str(sft_dir / "hf_actor"),
        "loss_agg_mode": "token-mean",
        "dapo_overrides": [*PRESETS[args.preset], *args.overrides],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    plot_curve(rows, out / "learning_curve.png")
    print(json.dumps(summary))
    print(f"wrote {out / 'summary.json'} and {out / 'learning_curve.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
