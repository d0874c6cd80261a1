"""Print the table of scripts/compare_loss_modes.sh from each run's metrics.jsonl (numbers as logged)."""
import json
import sys
from pathlib import Path


def step_mean(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if key in r]
    return sum(values) / len(values) if values else None


def main(out: str, *names: str) -> None:
    keys = ["rollout_corr/kl", "rollout_corr/k3_kl", "rollout_corr/rollout_is_mean", "rollout_corr/rollout_is_max",
            "rollout_corr/rollout_is_std", "rollout_corr/rollout_is_eff_sample_size",
            "rollout_corr/rollout_is_ratio_fraction_high", "rollout_corr/masked_fraction"]
    for name in names:
        path = Path(out) / name / "metrics.jsonl"
        if not path.is_file():
            print(f"{name}: no metrics")
            continue
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        train = [r for r in rows if "train/success_rate" in r]
        val = [r["val/success_rate"] for r in rows if "val/success_rate" in r]
        print(json.dumps({
            "run": name, "train_success_per_step": [round(r["train/success_rate"], 3) for r in train],
            "heldout_before_after": val, "actor/ppo_kl_mean": step_mean(train, "actor/ppo_kl"),
            "actor/pg_clipfrac_mean": step_mean(train, "actor/pg_clipfrac"),
            "timing/old_log_prob_mean_s": step_mean(train, "timing/old_log_prob"), "timing/step_mean_s": step_mean(train, "timing/step"),
            **{f"{k}_mean": step_mean(train, k) for k in keys if any(k in r for r in train)}}))


if __name__ == "__main__":
    main(*sys.argv[1:])
