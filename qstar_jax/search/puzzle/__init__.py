"""qstar_jax.search.puzzle: batched, jitted A* and Q* over puzzle environments, sharing one
loop (``loop.py``) and the static-capacity tables of ``qstar_jax.search.open_list``."""

from qstar_jax.search.puzzle.astar import HeuristicFn, astar_search
from qstar_jax.search.puzzle.qstar import QFn, qstar_search
from qstar_jax.search.puzzle.result import SearchResult

__all__ = ["HeuristicFn", "QFn", "SearchResult", "astar_search", "qstar_search"]
