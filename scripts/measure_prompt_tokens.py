"""Where a step-mode prompt's tokens go: every turn's prompt along the explore teacher's episodes (the
walkthrough after 0..max_detours seeded detours, as sft.teacher=explore) of some training games, tokenised
with the chat template. Prints one JSON object: mean prompt tokens a row, and the system message's and the
history's shares. Every model pass (generation prefill, update, SFT) runs over whole prompts.

    python scripts/measure_prompt_tokens.py outputs/demo/data/json_2.1.1/train [--games 40] [--history-window 2]
        [--system-prompt full|brief]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agentevolver.alfworld.agent import SYSTEM_PROMPT_STYLES, TurnView, build_messages, system_prompt
from agentevolver.alfworld.data import GAME_FILE, detect_command_wording
from agentevolver.alfworld.engine import GameEngine
from agentevolver.alfworld.play import WalkthroughPolicy


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("games_dir")
    ap.add_argument("--games", type=int, default=40)
    ap.add_argument("--history-window", type=int, default=2)
    ap.add_argument("--max-detours", type=int, default=2)
    ap.add_argument("--system-prompt", choices=SYSTEM_PROMPT_STYLES, default="full", help="env.system_prompt")
    ap.add_argument("--tokenizer", default=str(REPO / "models" / "tiny-qwen2"))
    args = ap.parse_args(argv)
    games = sorted(Path(args.games_dir).rglob(GAME_FILE))[: args.games]
    if not games:
        print(f"error: no {GAME_FILE} below {args.games_dir}", file=sys.stderr)
        return 2
    if not (Path(args.tokenizer) / "tokenizer_config.json").is_file():
        print(f"error: --tokenizer {args.tokenizer}: no tokenizer_config.json there (make tiny-model builds it)",
              file=sys.stderr)
        return 2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    system_message = system_prompt(detect_command_wording(games), args.system_prompt)

    def count(messages: list[dict], generation_prompt: bool = True) -> int:
        ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
        return len(ids["input_ids"] if hasattr(ids, "keys") else ids)

    engine, total, system, history, rows = GameEngine(), 0, 0, 0, 0
    teacher = WalkthroughPolicy(seed=0, max_detours=args.max_detours)  # the SFT explore teacher's plans
    for game in games:
        r = engine.reset(game)
        seen: list[tuple[str, str]] = []
        observation, admissible = r.observation, r.admissible
        for step in range(64):
            view = TurnView(str(game), r.info["task"], observation, admissible, list(seen), step, r.info)
            messages = build_messages(r.info["task"], observation, admissible, seen, args.history_window, system_message)
            n = count(messages)
            total, rows = total + n, rows + 1
            system += count(messages[:1], generation_prompt=False)
            history += n - count(build_messages(r.info["task"], observation, admissible, [], args.history_window,
                                                system_message))
            action = teacher.action(view)
            seen.append((observation, action))
            result = engine.step(action)
            observation, admissible = result.observation, result.admissible
            if result.done:
                break
    print(json.dumps({"games": len(games), "rows": rows, "prompt_tokens_mean": round(total / rows, 1),
                      "system_tokens_mean": round(system / rows, 1), "system_share": round(system / total, 3),
                      "history_tokens_mean": round(history / rows, 1), "history_share": round(history / total, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
