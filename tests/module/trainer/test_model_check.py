"""Issue 14 item 10: the model folder is checked completely before start (config, weights, tokenizer).

Each broken folder is a copy of the tiny model with one fault; the entry point exits 2 with one line,
before Ray starts."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from agentevolver.module.trainer.model_check import ModelFolderError, check_model_folder, safetensors_problem
from tests.helpers import one_line_error, run_main_ppo


def broken_copy(src: Path, dst: Path, fault: str) -> Path:
    shutil.copytree(src, dst)
    if fault == "no_tokenizer":
        (dst / "tokenizer.json").unlink()
    elif fault == "truncated_weights":
        weights = dst / "model.safetensors"
        with open(weights, "r+b") as f:
            f.truncate(weights.stat().st_size - 1000)
    elif fault == "no_weights":
        (dst / "model.safetensors").unlink()
    elif fault == "no_config":
        (dst / "config.json").unlink()
    elif fault == "garbage_weights":
        (dst / "model.safetensors").write_bytes(b"\xff" * 64)
    return dst


def test_the_tiny_model_passes(tiny_model_dir):
    check_model_folder(tiny_model_dir)
    assert safetensors_problem(tiny_model_dir / "model.safetensors") is None


@pytest.mark.parametrize("fault,expect", [
    ("no_tokenizer", "does not round-trip the system prompt"),
    ("truncated_weights", "truncated or padded: tensors end at byte"),
    ("no_weights", "no weights"),
    ("no_config", "no HF model folder (config.json)"),
    ("garbage_weights", "header claims"),
])
def test_each_fault_is_one_line(fault, expect, tiny_model_dir, tmp_path):
    folder = broken_copy(tiny_model_dir, tmp_path / fault, fault)
    with pytest.raises(ModelFolderError) as info:
        check_model_folder(folder)
    msg = str(info.value)
    print(msg)
    assert expect in msg and "\n" not in msg


def test_no_tokenizer_reports_the_2_token_tokenizer(tiny_model_dir, tmp_path):
    folder = broken_copy(tiny_model_dir, tmp_path / "m", "no_tokenizer")
    with pytest.raises(ModelFolderError, match=r"the tokenizer \(2 tokens; .*got 0 ids"):
        check_model_folder(folder)


@pytest.mark.parametrize("fault", ["no_tokenizer", "truncated_weights"])
def test_entry_point_exits_2_with_one_line(fault, tiny_model_dir, tmp_path):
    folder = broken_copy(tiny_model_dir, tmp_path / fault, fault)
    t0 = time.perf_counter()
    proc = run_main_ppo([f"actor_rollout_ref.model.path={folder}", f"hydra.run.dir={tmp_path / 'hydra'}",
                         f"trainer.default_local_dir={tmp_path / 'out'}"], timeout=60)
    secs = time.perf_counter() - t0
    err = one_line_error(proc)
    print(f"({secs:.1f} s)")
    assert err.startswith(f"error: actor_rollout_ref.model.path='{folder}' is invalid: ")
    assert not (tmp_path / "out").exists()  # refused before anything ran
    assert secs < 20  # ~5 s on an idle 2-core box (transformers import + tokenizer load); shared in CI
