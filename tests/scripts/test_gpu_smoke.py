"""scripts/gpu_smoke.sh at GPU_SMOKE_SHAPE=tiny on CPU, so the GPU smoke never rots (issue 13 item 12)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.helpers import REPO

PHASES = {"gen", "old_log_prob", "update_actor", "sync_weights"}


def test_gpu_smoke_tiny_on_cpu() -> None:
    env = dict(os.environ, GPU_SMOKE_SHAPE="tiny", PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="",
               OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", "scripts/gpu_smoke.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout  # ONE JSON line on stdout
    out = json.loads(lines[0])
    assert (out["shape"], out["device"], out["gpu"]) == ("tiny", "cpu", None)
    assert out["unavailable_imports"] == []  # no ray / hydra / omegaconf / wandb / alfworld / vllm
    assert out["attn_implementation"] == "sdpa" and out["dtype"] == "float32"
    assert len(out["rounds"]) == 2
    assert set(out["phase_time_s"]) == PHASES and all(v > 0 for v in out["phase_time_s"].values())
    assert set(out["peak_mem_gib"]) == PHASES and all(v is None for v in out["peak_mem_gib"].values())  # CPU
    assert out["step_time_s"] >= sum(out["phase_time_s"].values()) - 0.002  # each value rounded to 1 ms
    assert out["gen_tokens_per_s"] > 0 and out["rounds"][1]["gen_tokens"] == 4 * 8
    # the hf engine and the FSDP actor compute the same fp32 log-probs on CPU
    assert 0 <= out["probs_diff_mean"] < 1e-6 and out["log_probs_diff_mean"] < 1e-5
    assert isinstance(out["pg_loss"], float)
    plan = out["plan_memory"]  # the analytic plan of the same config, beside the measured peaks
    assert plan["per_gpu_peak_gib"] > 0 and plan["gpu_memory_gib"] == 80.0 and plan["world"] == 1
