"""Issue 14 item 11: a checkpoint is complete only with its marker and every listed file at its size;
resume_mode=auto takes the newest complete one and says which it skipped; a named broken one fails."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from agentevolver.module.trainer.checkpoint_manager import (
    MARKER,
    CheckpointError,
    CheckpointManager,
    checkpoint_problem,
)
from tests.helpers import one_line_error, run_main_ppo

WORLD = 2


def write_ranks(actor_dir: Path) -> None:
    """The workers' layout: a DCP folder (one shard per rank) + extra_state_rank<r>.pt per rank.
    Single-process DCP writes one shard; a second rank's shard file is added as the trainer's would be."""
    dcp.save({"model": {"w": torch.arange(1000, dtype=torch.float32)}}, checkpoint_id=str(actor_dir / "actor"))
    shard = next((actor_dir / "actor").glob("*.distcp"))
    (actor_dir / "actor" / "__1_0.distcp").write_bytes(shard.read_bytes())
    for r in range(WORLD):
        torch.save({"rank": r}, actor_dir / f"extra_state_rank{r}.pt")


@pytest.fixture
def three_steps(tmp_path) -> CheckpointManager:
    mgr = CheckpointManager(tmp_path / "out", max_to_keep=3)
    for step in (1, 2, 3):
        mgr.save(step, {"global_step": step}, write_ranks, world_size=WORLD)
    return mgr


def test_saved_checkpoints_are_complete(three_steps):
    for path in three_steps.list_steps():
        assert checkpoint_problem(path) is None
        files = json.loads((path / MARKER).read_text())["files"]
        assert {"trainer_state.json", "actor/actor/.metadata", "actor/actor/__1_0.distcp",
                "actor/extra_state_rank1.pt"} <= set(files)
    assert three_steps.find_resume("auto") == (three_steps.root / "global_step_3", None)


def test_auto_skips_a_truncated_shard_and_a_missing_trainer_state(three_steps):
    root = three_steps.root
    shard = root / "global_step_3" / "actor" / "actor" / "__1_0.distcp"
    size = shard.stat().st_size
    os.truncate(shard, size // 2)
    (root / "global_step_2" / "trainer_state.json").unlink()
    path, note = three_steps.find_resume("auto")
    print(note)
    assert path == root / "global_step_1"
    assert note == (f"resume: skipped incomplete global_step_3: actor/actor/__1_0.distcp is {size // 2} bytes, "
                    f"{MARKER} says {size}; global_step_2: trainer_state.json is missing; resuming from global_step_1")


def test_a_save_that_did_not_finish_is_skipped(three_steps):
    (three_steps.root / "global_step_3" / MARKER).unlink()  # as a folder renamed by hand / a pre-marker save
    path, note = three_steps.find_resume("auto")
    assert path.name == "global_step_2" and "global_step_3: no COMPLETE.json" in note


def test_no_complete_checkpoint_starts_from_scratch_and_says_so(tmp_path):
    mgr = CheckpointManager(tmp_path, max_to_keep=2)
    (tmp_path / "global_step_4").mkdir()
    path, note = mgr.find_resume("auto")
    assert path is None and note.endswith("no complete checkpoint left: starting from step 0")
    assert mgr.find_resume("disable") == (None, None)


def test_a_missing_rank_file_refuses_the_marker(tmp_path):
    mgr = CheckpointManager(tmp_path, max_to_keep=2)
    with pytest.raises(CheckpointError, match="missing actor/extra_state_rank2.pt"):
        mgr.save(1, {}, write_ranks, world_size=3)  # 3 ranks expected, 2 wrote
    assert not (tmp_path / "global_step_1").exists()


def test_a_named_broken_checkpoint_fails_in_one_line(three_steps, tiny_model_dir, shared_alfworld, tmp_path):
    broken = three_steps.root / "global_step_3"
    (broken / "trainer_state.json").unlink()
    with pytest.raises(CheckpointError, match="trainer_state.json is missing"):
        three_steps.find_resume(str(broken))
    err = one_line_error(run_main_ppo([
        f"actor_rollout_ref.model.path={tiny_model_dir}", f"env.alfworld.data_dir={shared_alfworld}",
        "env.alfworld.train_split=valid_train", f"trainer.resume_mode={broken}",
        f"trainer.default_local_dir={tmp_path / 'run'}", f"hydra.run.dir={tmp_path / 'hydra'}"]))
    assert err == (f"error: trainer.resume_mode={str(broken)!r} is invalid: not a complete checkpoint: "
                   "trainer_state.json is missing; name a complete global_step_N folder, or use auto "
                   "(the newest complete one)")
