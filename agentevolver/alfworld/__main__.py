"""`python -m agentevolver.alfworld {play,generate} ...`: play games with a policy, or generate games."""
from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = "usage: python -m agentevolver.alfworld {play,generate} [options]  (-h after a command for help)"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    from agentevolver.alfworld.data import AlfworldDataError

    try:
        if command == "play":
            from agentevolver.alfworld.play import main as play_main

            return play_main(rest)
        if command == "generate":
            from agentevolver.alfworld.generator import main as generate_main  # the other engineer's module

            return generate_main(rest) or 0
    except AlfworldDataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"error: unknown command {command!r}; valid: play, generate", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
