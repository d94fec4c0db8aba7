"""Q* search vs A* search on the Rubik's cube (12 and 1,884 actions) and the 15-puzzle.

  python -m experiments.qstar_search preset=cpu out=runs/qstar_search

Reproduces the comparison of Agostinelli et al., "A* search without expansions" with the networks
committed under experiments/checkpoints (see the README there for the commands that trained them):
- ratio rows: cube scrambles of ``ratio_min_depth..ratio_max_depth`` random quarter turns (uniform,
  seeded), solved by A* (value network V) and Q* (Q network) at 12 and at 1,884 actions, with the
  same weight and batch of pops; nodes generated and wall time per state, and the headline ratios;
- quality rows: the first states of the DeepCubeA test sets (cube3, puzzle15) with both searches,
  solved %, mean length, % optimal, against DeepCubeA's published figures;
- throughput: nodes generated per second of jitted Q* as the batch of pops N grows.
Writes ``out/results.json`` (the issue's format), ``out/table.md`` and ``out/*.png``.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
import time
from typing import Any

import jax
import numpy as np
from flax import nnx

from qstar_jax.envs import load_deepcubea, make_env
from qstar_jax.envs.puzzle import PuzzleEnv
from qstar_jax.models.puzzle_net import puzzle_net_apply_fn
from qstar_jax.search import astar_search, qstar_search
from qstar_jax.training.config import config_to_dict, parse_config
from qstar_jax.training.progress import progress
from qstar_jax.training.puzzle import load_puzzle_net
from qstar_jax.training.results import markdown_table, save_plot, write_results

PRESETS = pathlib.Path(__file__).resolve().parent / "presets" / "qstar_search"
CHECKPOINTS = pathlib.Path(__file__).resolve().parent / "checkpoints"

PUBLISHED = {  # DeepCubeA (Nature Machine Intelligence 2019) on these test sets
    "cube3": {"solved_pct": 100.0, "mean_length": 21.50, "pct_optimal": 60.3},
    "puzzle15": {"solved_pct": 100.0, "mean_length": 52.03, "pct_optimal": 99.4},
}


@dataclasses.dataclass(frozen=True)
class SearchSettings:
  weight: float = 0.6  # lambda in f = lambda * g + h (resp. + q)
  batch_pops: int = 10  # N
  max_iterations: int = 200
  node_capacity: int = 200_000
  open_capacity: int = 0  # 0: node_capacity (A*) / node_capacity * 4 (Q*)
  max_path_len: int = 64
  edges_per_node: int = 0  # Q*: keep each node's E cheapest edges (lax.top_k); 0 = all (sort)


@dataclasses.dataclass(frozen=True)
class QStarSearchConfig:
  checkpoints: str = ""  # folder of trained networks; "" = experiments/checkpoints
  cube_value_net: str = "cube3_v_cpu"
  cube_q12_net: str = "cube3_q12_vdistill_cpu"
  cube_q1884_net: str = "cube3_q1884_vdistill_cpu"
  puzzle15_value_net: str = "puzzle15_v_cpu_long"
  puzzle15_q_net: str = "puzzle15_q_vdistill_cpu_long"
  sections: tuple[str, ...] = ("ratio", "deepcubea_cube3", "deepcubea_puzzle15", "throughput")
  # Ratio rows: cube scrambles of uniform random depth in [min, max] quarter turns.
  ratio_num_states: int = 10
  ratio_min_depth: int = 5
  ratio_max_depth: int = 8
  ratio_seed: int = 0
  ratio_search: SearchSettings = SearchSettings()
  ratio_search_1884: SearchSettings = SearchSettings(max_iterations=100, node_capacity=400_000)
  # Quality rows: the first states of the DeepCubeA test sets.
  deepcubea_cube3_states: int = 5
  deepcubea_puzzle15_states: int = 10
  deepcubea_search: SearchSettings = SearchSettings(weight=0.6, batch_pops=100,
                                                    max_iterations=200, node_capacity=100_000,
                                                    max_path_len=128)
  # Throughput: jitted Q* nodes generated per second for each N (cube, fixed iterations).
  throughput_batch_pops: tuple[int, ...] = (1, 10, 100, 1000)
  throughput_iterations: int = 30
  throughput_edges_per_node: int = 64  # also measured at 1,884 actions (besides all edges)
  out: str = ""


# ------------------------------------------------------------------------------- networks
def _load(cfg: QStarSearchConfig, name: str, env: PuzzleEnv):
  root = pathlib.Path(cfg.checkpoints) if cfg.checkpoints else CHECKPOINTS
  path = root / name / "model"
  if not path.exists():
    raise FileNotFoundError(
        f"network {path} not found; train it with `python -m experiments.train_puzzle "
        f"preset={name} out=/tmp/{name}` and copy /tmp/{name}/model there (see "
        f"experiments/checkpoints/README.md)")
  model = load_puzzle_net(path)
  graphdef, params = nnx.split(model)
  return puzzle_net_apply_fn(graphdef, env), params, model.config


# ------------------------------------------------------------------------------- running
def run_search(method: str, env: PuzzleEnv, fn, params, states: np.ndarray,
               s: SearchSettings, *, desc: str) -> dict[str, Any]:
  """Solves each state alone (B = 1, timed after a compile-warmup call); returns raw records."""
  # A search never stores more than 1 + (children per iteration) * iterations nodes: capacities
  # are capped there (static sizes cost time to allocate and scan).
  if method == "astar":
    cap = min(s.node_capacity, 1 + s.batch_pops * env.num_actions * s.max_iterations)
    open_cap = s.open_capacity or cap
    open_cap = max(open_cap, s.batch_pops * env.num_actions)
    call = lambda x, iters: astar_search(  # noqa: E731
        params, x, env=env, heuristic_fn=fn, weight=s.weight, batch_pops=s.batch_pops,
        max_iterations=iters, node_capacity=cap, open_capacity=open_cap,
        max_path_len=s.max_path_len)
  else:
    cap = min(s.node_capacity, 1 + s.batch_pops * s.max_iterations)
    open_cap = s.open_capacity or 2 * cap
    call = lambda x, iters: qstar_search(  # noqa: E731
        params, x, env=env, q_fn=fn, weight=s.weight, batch_pops=s.batch_pops,
        max_iterations=iters, node_capacity=cap, open_capacity=open_cap,
        max_path_len=s.max_path_len, edges_per_node=s.edges_per_node or None)
  jax.block_until_ready(call(states[:1], 1))  # compile (same shapes as the timed calls)
  recs = []
  for x in progress(states, desc=desc, unit="state"):
    t0 = time.perf_counter()
    r = jax.block_until_ready(call(x[None], s.max_iterations))
    sec = time.perf_counter() - t0
    found = bool(r.found[0]) and not bool(r.path_truncated[0])
    path = np.asarray(r.path[0])
    base = env.expand_path(path) if found else None
    if found:  # every returned path is replayed
      assert np.array_equal(env.replay(x, path), env.goal), "search returned a wrong path"
    recs.append({"found": found, "path": base, "cost": float(r.path_cost[0]) if found else None,
                 "nodes_generated": int(r.nodes_generated[0]),
                 "iterations": int(r.iterations[0]), "seconds": sec,
                 "overflow": bool(r.overflow[0])})
  return recs


def summarize(domain: str, actions: int, method: str, states_desc: str, states: np.ndarray,
              recs: list[dict], *, state_ids=None, optimal=None, search: SearchSettings,
              network: str) -> dict[str, Any]:
  solved = [r for r in recs if r["found"]]
  lengths = [len(r["path"]) for r in solved]
  run = {
      "domain": domain, "actions": actions, "method": method, "states": states_desc,
      "state_ids": state_ids, "start_states": states.tolist(),
      "paths": [r["path"] for r in recs],
      "solved_frac": len(solved) / max(len(recs), 1),
      "mean_length": float(np.mean(lengths)) if lengths else None,
      "mean_nodes_generated": float(np.mean([r["nodes_generated"] for r in recs])),
      "mean_seconds": float(np.mean([r["seconds"] for r in recs])),
      "mean_iterations": float(np.mean([r["iterations"] for r in recs])),
      "overflows": int(sum(r["overflow"] for r in recs)),
      "network": network, "search": dataclasses.asdict(search),
  }
  if optimal is not None:
    opt = [int(optimal[i]) for i, r in enumerate(recs) if r["found"]]
    run["mean_optimal_length_of_solved"] = float(np.mean(opt)) if opt else None
    run["pct_optimal"] = 100.0 * sum(len(r["path"]) == optimal[i] for i, r in enumerate(recs)
                                     if r["found"]) / max(len(recs), 1)
  return run


def ratio_section(cfg: QStarSearchConfig) -> list[dict]:
  env12, env1884 = make_env("cube3", 12), make_env("cube3", 1884)
  states, depths = env12.scramble(jax.random.key(cfg.ratio_seed), num_states=cfg.ratio_num_states,
                                  max_depth=cfg.ratio_max_depth, min_depth=cfg.ratio_min_depth)
  states = np.asarray(states)
  desc = (f"cube scrambles: {cfg.ratio_num_states} states, depth uniform in "
          f"[{cfg.ratio_min_depth}, {cfg.ratio_max_depth}] random quarter turns, seed "
          f"{cfg.ratio_seed} (mean depth {float(np.mean(depths)):.2f})")
  runs = []
  for env, s in ((env12, cfg.ratio_search), (env1884, cfg.ratio_search_1884)):
    v_fn, v_params, _ = _load(cfg, cfg.cube_value_net, env)
    qname = cfg.cube_q12_net if env.num_actions == 12 else cfg.cube_q1884_net
    q_fn, q_params, _ = _load(cfg, qname, env)
    for method, fn, params, net in (("astar", v_fn, v_params, cfg.cube_value_net),
                                    ("qstar", q_fn, q_params, qname)):
      recs = run_search(method, env, fn, params, states, s,
                        desc=f"cube{env.num_actions} {method}")
      runs.append(summarize("cube3", env.num_actions, method, desc, states, recs, search=s,
                            network=net))
  return runs


def deepcubea_section(cfg: QStarSearchConfig, domain: str) -> list[dict]:
  data = load_deepcubea(domain)
  n = cfg.deepcubea_cube3_states if domain == "cube3" else cfg.deepcubea_puzzle15_states
  ids = list(range(min(n, len(data["states"]))))
  states = data["states"][ids]
  optimal = data["optimal_lengths"][ids]
  runs = []
  env = make_env(domain)
  vname = cfg.cube_value_net if domain == "cube3" else cfg.puzzle15_value_net
  qname = cfg.cube_q12_net if domain == "cube3" else cfg.puzzle15_q_net
  for method, name in (("astar", vname), ("qstar", qname)):
    fn, params, _ = _load(cfg, name, env)
    recs = run_search(method, env, fn, params, states, cfg.deepcubea_search,
                      desc=f"{domain} deepcubea {method}")
    runs.append(summarize(domain, env.num_actions, method, "deepcubea", states, recs,
                          state_ids=ids, optimal=optimal, search=cfg.deepcubea_search,
                          network=name))
  return runs


def throughput_section(cfg: QStarSearchConfig) -> list[dict]:
  """Q* from a DeepCubeA cube state (not solved within the budget) for a fixed number of
  iterations: nodes generated per second of the jitted search, per N and action space."""
  out = []
  state = load_deepcubea("cube3")["states"][:1]
  settings = [(12, cfg.cube_q12_net, None), (1884, cfg.cube_q1884_net, None)]
  if cfg.throughput_edges_per_node:
    settings.append((1884, cfg.cube_q1884_net, cfg.throughput_edges_per_node))
  for actions, name, edges in settings:
    env = make_env("cube3", actions)
    fn, params, _ = _load(cfg, name, env)
    for n in cfg.throughput_batch_pops:
      iters = cfg.throughput_iterations
      cap = n * iters + 1
      call = lambda x, it, n=n, cap=cap, env=env, fn=fn, params=params, edges=edges: qstar_search(  # noqa: E731
          params, x, env=env, q_fn=fn, batch_pops=n, max_iterations=it, node_capacity=cap,
          weight=0.6, edges_per_node=edges)
      jax.block_until_ready(call(state, 1))
      t0 = time.perf_counter()
      r = jax.block_until_ready(call(state, iters))
      sec = time.perf_counter() - t0
      out.append({"actions": actions, "edges_per_node": edges or actions, "batch_pops": n, "iterations": int(r.iterations[0]),
                  "nodes_generated": int(r.nodes_generated[0]), "seconds": sec,
                  "nodes_per_second": int(r.nodes_generated[0]) / sec})
  return out


def ratios(runs: list[dict]) -> dict[str, float | None]:
  def get(actions, method):
    for r in runs:
      if r["domain"] == "cube3" and r["actions"] == actions and r["method"] == method and \
          r["states"] != "deepcubea":
        return r
    return None

  a, q, q12 = get(1884, "astar"), get(1884, "qstar"), get(12, "qstar")
  div = lambda x, y: (x / y) if (x is not None and y) else None  # noqa: E731
  return {
      "astar_over_qstar_nodes": div(a and a["mean_nodes_generated"], q and q["mean_nodes_generated"]),
      "astar_over_qstar_seconds": div(a and a["mean_seconds"], q and q["mean_seconds"]),
      "qstar_large_over_small_nodes": div(q and q["mean_nodes_generated"],
                                          q12 and q12["mean_nodes_generated"]),
      "qstar_large_over_small_seconds": div(q and q["mean_seconds"], q12 and q12["mean_seconds"]),
  }


def _fmt(v, f="{:.2f}"):
  return "-" if v is None else f.format(v)


def make_table(cfg: QStarSearchConfig, runs, rat, throughput) -> str:
  rows = []
  for r in runs:
    rows.append([r["domain"], r["actions"], r["method"],
                 "DeepCubeA test set" if r["states"] == "deepcubea" else "scrambles",
                 len(r["start_states"]), _fmt(100 * r["solved_frac"], "{:.1f}"),
                 _fmt(r["mean_length"]), _fmt(r.get("mean_optimal_length_of_solved")),
                 _fmt(r.get("pct_optimal"), "{:.1f}"), _fmt(r["mean_nodes_generated"], "{:.0f}"),
                 _fmt(r["mean_seconds"], "{:.3f}"), r["overflows"]])
  md = ["# Q* search vs A* search", ""]
  md.append(markdown_table(["domain", "actions", "method", "states", "n", "solved %",
                            "mean length", "optimal length (solved)", "% optimal",
                            "nodes generated", "seconds", "overflows"], rows))
  ratio_runs = [r for r in runs if r["states"] != "deepcubea"]
  if ratio_runs:
    md += ["", f"Ratio rows: {ratio_runs[0]['states']}.",
           f"Search: lambda = {cfg.ratio_search.weight}, N = {cfg.ratio_search.batch_pops} pops "
           f"per iteration at 12 actions, N = {cfg.ratio_search_1884.batch_pops} at 1,884; Q* at "
           f"1,884 keeps {cfg.ratio_search_1884.edges_per_node or 1884} edges per node (lax.top_k; "
           "overflows count nodes whose kept edges ran out)."]
  md += ["", "## Headline ratios (cube scrambles)", "",
         markdown_table(["ratio", "value", "target (paper)"], [
             ["A* / Q* nodes generated, 1,884 actions", _fmt(rat["astar_over_qstar_nodes"], "{:.1f}x"),
              ">= 100x (paper up to 1,288x)"],
             ["A* / Q* seconds, 1,884 actions", _fmt(rat["astar_over_qstar_seconds"], "{:.1f}x"),
              ">= 20x (paper up to 129x)"],
             ["Q* nodes, 1,884 / 12 actions", _fmt(rat["qstar_large_over_small_nodes"], "{:.2f}x"),
              "< 3x"],
             ["Q* seconds, 1,884 / 12 actions", _fmt(rat["qstar_large_over_small_seconds"], "{:.2f}x"),
              "< 4x"]])]
  dq = [r for r in runs if r["states"] == "deepcubea"]
  if dq:
    md += ["", "## DeepCubeA test sets vs the published DeepCubeA figures", ""]
    prow = []
    for r in dq:
      p = PUBLISHED[r["domain"]]
      prow.append([r["domain"], r["method"], len(r["start_states"]),
                   f"{100 * r['solved_frac']:.1f} / {p['solved_pct']:.1f}",
                   f"{_fmt(r['mean_length'])} / {p['mean_length']:.2f}",
                   f"{_fmt(r.get('pct_optimal'), '{:.1f}')} / {p['pct_optimal']:.1f}"])
    md.append(markdown_table(["domain", "method", "states (first n of the set)",
                              "solved % (ours / DeepCubeA)", "mean length (ours / DeepCubeA)",
                              "% optimal (ours / DeepCubeA)"], prow))
  if throughput:
    md += ["", "## Jitted Q* throughput (cube, one problem, this machine)", "",
           markdown_table(["actions", "edges kept per node", "N (pops / iteration)", "iterations",
                           "nodes generated", "seconds", "nodes / second"],
                          [[t["actions"], t["edges_per_node"], t["batch_pops"], t["iterations"],
                            t["nodes_generated"],
                            f"{t['seconds']:.3f}", f"{t['nodes_per_second']:.0f}"]
                           for t in throughput])]
  return "\n".join(md) + "\n"


def make_plots(out: pathlib.Path, runs, throughput) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  ratio_runs = [r for r in runs if r["states"] != "deepcubea"]
  if ratio_runs:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    labels = [f"{r['method']}\n{r['actions']}" for r in ratio_runs]
    axes[0].bar(labels, [r["mean_nodes_generated"] for r in ratio_runs])
    axes[0].set_yscale("log")
    axes[0].set_title("nodes generated / state")
    axes[1].bar(labels, [r["mean_seconds"] for r in ratio_runs])
    axes[1].set_yscale("log")
    axes[1].set_title("seconds / state")
    fig.tight_layout()
    save_plot(fig, out / "ratios.png")
    plt.close(fig)
  if throughput:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for actions, edges in sorted({(t["actions"], t["edges_per_node"]) for t in throughput}):
      pts = [t for t in throughput if t["actions"] == actions and t["edges_per_node"] == edges]
      ax.plot([t["batch_pops"] for t in pts], [t["nodes_per_second"] for t in pts], "o-",
              label=f"{actions} actions, {edges} edges kept")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("N (edges popped per iteration)")
    ax.set_ylabel("nodes generated / second")
    ax.legend()
    fig.tight_layout()
    save_plot(fig, out / "throughput.png")
    plt.close(fig)


def run(cfg: QStarSearchConfig) -> dict[str, Any]:
  if not cfg.out:
    raise ValueError("out=DIR is required")
  known = {"ratio", "deepcubea_cube3", "deepcubea_puzzle15", "throughput"}
  if set(cfg.sections) - known:
    raise ValueError(f"unknown sections {sorted(set(cfg.sections) - known)}; expected {sorted(known)}")
  out = pathlib.Path(cfg.out)
  out.mkdir(parents=True, exist_ok=True)
  runs: list[dict] = []
  if "ratio" in cfg.sections:
    runs += ratio_section(cfg)
  if "deepcubea_cube3" in cfg.sections:
    runs += deepcubea_section(cfg, "cube3")
  if "deepcubea_puzzle15" in cfg.sections:
    runs += deepcubea_section(cfg, "puzzle15")
  throughput = throughput_section(cfg) if "throughput" in cfg.sections else []
  rat = ratios(runs)
  results = {"config": config_to_dict(cfg), "runs": runs, "ratios": rat,
             "throughput": throughput, "published_deepcubea": PUBLISHED,
             "device": str(jax.devices()[0])}
  table = make_table(cfg, runs, rat, throughput)
  write_results(out, results=results, table_md=table)
  make_plots(out, runs, throughput)
  print(table)
  return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
  cfg = parse_config(QStarSearchConfig, sys.argv[1:] if argv is None else argv,
                     presets_dir=PRESETS)
  return run(cfg)


if __name__ == "__main__":
  main()
