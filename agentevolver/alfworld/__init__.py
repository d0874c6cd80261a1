"""ALFWorld environment layer: game data, the engine, the Ray env pool, and the agent loop.

Import the submodules directly (`agentevolver.alfworld.pool` pulls in Ray; `engine` pulls in TextWorld).
"""
from agentevolver.alfworld.data import TASK_TYPES, AlfworldDataError, GameSpec, list_games, resolve_data_dir

__all__ = ["TASK_TYPES", "AlfworldDataError", "GameSpec", "list_games", "resolve_data_dir"]
