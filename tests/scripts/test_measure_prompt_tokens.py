"""scripts/measure_prompt_tokens.py on generated games with the project's tokenizer: the shares it prints
are those of one prompt counted by hand."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import REPO


def test_prompt_token_shares(gen_data, tiny_model_dir) -> None:
    from transformers import AutoTokenizer

    from agentevolver.alfworld.agent import system_prompt

    proc = subprocess.run([sys.executable, "scripts/measure_prompt_tokens.py", str(gen_data / "json_2.1.1" / "train"),
                           "--tokenizer", str(tiny_model_dir), "--history-window", "0"], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    system = len(tok.apply_chat_template([{"role": "system", "content": system_prompt()}], tokenize=True)["input_ids"])
    assert out["games"] == 4 and out["rows"] >= 4 * 3  # generated walkthroughs are 3-10 commands
    assert out["system_tokens_mean"] == system  # the same system message on every row
    assert out["history_tokens_mean"] == 0 and out["history_share"] == 0  # --history-window 0: none shown
    assert abs(out["system_share"] - system / out["prompt_tokens_mean"]) < 2e-3  # both printed rounded
    missing = subprocess.run([sys.executable, "scripts/measure_prompt_tokens.py", str(gen_data / "nowhere")],
                             cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert missing.returncode == 2 and missing.stderr.strip().startswith("error: no game.tw-pddl below")
    no_tokenizer = subprocess.run([sys.executable, "scripts/measure_prompt_tokens.py", str(gen_data),
                                   "--tokenizer", str(gen_data / "nowhere")], cwd=REPO, capture_output=True,
                                  text=True, timeout=120, check=False)
    assert no_tokenizer.returncode == 2 and "no tokenizer_config.json there" in no_tokenizer.stderr
