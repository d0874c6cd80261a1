"""Test-wide settings: one torch thread, wandb offline, hydra output in a temp dir, real shared data."""
import os
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import pytest
import torch

torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_ALFWORLD = REPO_ROOT.parent / "shared" / "alfworld"


@pytest.fixture(scope="session")
def shared_alfworld() -> Path:
    """The real ALFWorld games (0.4.2 format) that live beside the checkout."""
    if not (SHARED_ALFWORLD / "json_2.1.1").is_dir():
        pytest.fail(f"real ALFWorld data not found at {SHARED_ALFWORLD}: tests need ../shared/alfworld")
    return SHARED_ALFWORLD


@pytest.fixture
def hydra_out(tmp_path) -> str:
    """Override for hydra.run.dir so runs never write into the repo."""
    return f"hydra.run.dir={tmp_path / 'hydra'}"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The project's tiny Qwen2 model + ALFWorld tokenizer, built once per test session."""
    from agentevolver.models.build_tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-qwen2")


@pytest.fixture(scope="session")
def drops_think_template() -> str:
    """A chat template that does NOT append (Qwen3-style): re-rendering the history drops the <think>
    block of every assistant turn but the last, so the next prompt no longer extends the previous one."""
    return (
        "{%- for message in messages %}{%- set content = message['content'] %}"
        "{%- if message['role'] == 'assistant' and not loop.last %}"
        "{%- set content = content.split('</think>')[-1] %}{%- endif %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>' + '\\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )


@pytest.fixture(scope="session")
def gen_data(tmp_path_factory) -> Path:
    """4 generated train games and 3 held-out ones (the trainer end-to-end tests' data)."""
    from agentevolver.alfworld.generator import generate_games

    out = tmp_path_factory.mktemp("games")
    generate_games(out, 4, seed=11, split="train", max_receptacles=8)
    generate_games(out, 3, seed=12, split="valid_seen", max_receptacles=8)
    return out
