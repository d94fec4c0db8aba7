"""qstar_jax.search: batched, jitted searches (A*, Q*)."""

from qstar_jax.search.astar import astar_search
from qstar_jax.search.open_list import SearchTables
from qstar_jax.search.qstar import qstar_search
from qstar_jax.search.result import SearchResult

__all__ = ["SearchResult", "SearchTables", "astar_search", "qstar_search"]
