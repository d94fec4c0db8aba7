"""qstar_jax.search: batched, jitted searches.

- ``search.puzzle``: A* and Q* over puzzle environments (``astar_search``, ``qstar_search``).
- ``search.open_list``: the static-capacity node store, closed set and open list (``SearchTables``)
  they share, keyed by state hashes so that any best-first search can use it.
- ``search.steps``: search over LM reasoning steps; today ``step_rollout`` (a batch of problems
  decoded one step at a time from the KV cache). MCTS, beam, best-of-N and particle filtering
  over steps are planned.
"""

from qstar_jax.search.open_list import SearchTables
from qstar_jax.search.puzzle import HeuristicFn, QFn, SearchResult, astar_search, qstar_search

__all__ = ["HeuristicFn", "QFn", "SearchResult", "SearchTables", "astar_search", "qstar_search"]
