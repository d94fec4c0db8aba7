"""Decode-speed acceptance benchmark.

    python -m experiments.bench_decode [model=smollm2] [batches=[1,16]] [prompt_len=32]
        [new_tokens=64] [repeats=3] [out=runs/bench_decode]
    python -m experiments.bench_decode gpu=true [out=...]        # on a GPU machine

CPU mode (fp32): our batched greedy decode (one jit: prefill + `lax.while_loop`) against
Hugging Face transformers' greedy `generate` on the same checkpoint (the SmolLM2 GGUF) on torch
CPU, measured in the same run in a subprocess of `torch_python` (torch is never imported here).
Both decode exactly `new_tokens` tokens per row (EOS does not stop either side) from the same
random prompts. Reports tokens/s of both, their ratio, and batch-1 tokens/s as a fraction of
the memory-bandwidth limit: bandwidth / parameter bytes, with the bandwidth measured by a large
host copy (bytes read + written per second) — each decode step reads every weight once.

GPU mode (no torch): batch-1 decode as a fraction of the HBM bandwidth limit
(weight bytes per second vs a large device-to-device copy's bytes read + written per second),
for each `gpu_runs` entry MODEL@DTYPE: by default SmolLM2's shape with random weights
(`preset:smollm2-135m`; decode speed does not depend on the values, and the GGUF may not be on
the GPU machine) with params in bfloat16 and in float32, plus `preset:llama-1b` (Llama-3.2-1B's
shape) in bfloat16: a 135M model reads its weights in ~0.1 ms of HBM time, so per-step kernel
overheads, not bandwidth, bound it; the 1B row shows the bandwidth regime.

Writes `out/results.json` and `out/table.md`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import tempfile
from typing import Any

import jax
import numpy as np

from qstar_jax.benchmarks.decode import (
  bench_decode,
  device_copy_bandwidth,
  gemm_floor_step_s,
  host_copy_bandwidth,
)
from qstar_jax.models import registry
from qstar_jax.models.loading import PRESET_PREFIX, load_model_spec
from qstar_jax.models.params import param_bytes
from qstar_jax.training.config import parse_config
from qstar_jax.training.results import markdown_table, write_results


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  model: str = "smollm2"            # CPU mode: registered name, .gguf file, HF dir, preset:NAME
  batches: tuple[int, ...] = (1, 16)
  prompt_len: int = 32
  new_tokens: int = 64
  repeats: int = 3
  torch_repeats: int = 1            # transformers runs are slow: best of this many
  torch: bool = True                # run the transformers baseline (CPU mode)
  torch_python: str = "/opt/torchenv/bin/python"
  # torch intra-op threads, one baseline run each (0: torch's default, all cores). On a shared,
  # oversubscribed machine torch's 2-thread runs can be several times slower than 1-thread
  # runs, so the speedup is taken against the FASTEST setting.
  torch_threads: tuple[int, ...] = (0, 1)
  gemm_floor: bool = True           # also time the step's weight matmuls alone (CPU mode)
  gpu: bool = False
  gpu_runs: tuple[str, ...] = ("preset:smollm2-135m@bfloat16", "preset:smollm2-135m@float32",
                                "preset:llama-1b@bfloat16")   # MODEL@DTYPE
  gpu_new_tokens: int = 128
  out: str = "runs/bench_decode"


TORCH_SCRIPT = r'''
import json, sys, time
import torch
from transformers import AutoModelForCausalLM
spec = json.load(open(sys.argv[1]))
if spec["threads"]:
  torch.set_num_threads(spec["threads"])
kwargs = {"gguf_file": spec["gguf_file"]} if spec["gguf_file"] else {}
try:
  model = AutoModelForCausalLM.from_pretrained(spec["dir"], dtype=torch.float32, **kwargs)
except TypeError:
  model = AutoModelForCausalLM.from_pretrained(spec["dir"], torch_dtype=torch.float32, **kwargs)
model.eval()
model.generation_config.eos_token_id = None  # decode exactly new_tokens, like the JAX side
n = spec["new_tokens"]
out = {"threads": torch.get_num_threads(), "torch": torch.__version__, "batches": {}}
for batch, prompt in spec["prompts"].items():
  ids = torch.tensor(prompt, dtype=torch.long)
  kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
  with torch.no_grad():
    model.generate(ids, max_new_tokens=4, **kw)  # warm-up
    times = []
    for _ in range(spec["repeats"]):
      start = time.perf_counter()
      gen = model.generate(ids, max_new_tokens=n, **kw)
      times.append(time.perf_counter() - start)
  assert gen.shape[1] == ids.shape[1] + n, gen.shape
  out["batches"][batch] = {"seconds": min(times), "tokens_per_s": int(batch) * n / min(times),
                           "row0_tokens": gen[0, ids.shape[1]:].tolist()}
print("RESULT " + json.dumps(out))
'''


def _torch_source(spec: str) -> tuple[str, str | None]:
  """(directory, gguf file name or None) of a model spec, for transformers."""
  if spec.startswith(PRESET_PREFIX):
    raise ValueError(f"model={spec}: the transformers baseline needs a real checkpoint")
  if spec in registry.registered_names():
    path = registry.model_file(spec)
  else:
    path = pathlib.Path(spec)
  if path.is_dir():
    return str(path), None
  return str(path.parent), path.name


def run_torch_baseline(cfg: BenchConfig, prompts: dict[int, np.ndarray],
                       threads: int) -> dict[str, Any]:
  directory, gguf_file = _torch_source(cfg.model)
  with tempfile.TemporaryDirectory() as tmp:
    spec_path = os.path.join(tmp, "spec.json")
    script_path = os.path.join(tmp, "bench_torch.py")
    with open(spec_path, "w") as f:
      json.dump({"dir": directory, "gguf_file": gguf_file, "threads": threads,
                 "new_tokens": cfg.new_tokens, "repeats": cfg.torch_repeats,
                 "prompts": {str(b): p.tolist() for b, p in prompts.items()}}, f)
    with open(script_path, "w") as f:
      f.write(TORCH_SCRIPT)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([cfg.torch_python, script_path, spec_path], capture_output=True,
                          text=True, env=env, timeout=3600)
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
  if proc.returncode != 0 or not lines:
    raise RuntimeError(f"transformers baseline failed (exit {proc.returncode}):\n"
                       f"{proc.stderr[-3000:]}")
  return json.loads(lines[-1][len("RESULT "):])


def _load(spec: str, dtype: str):
  model, _ = load_model_spec(spec, dtype=dtype)
  return model


def bench_cpu(cfg: BenchConfig) -> dict[str, Any]:
  rng = np.random.default_rng(0)
  model = _load(cfg.model, "float32")
  vocab = model.config.vocab_size
  # Ordinary-text-like ids (skip the low special ids) shared by both implementations.
  prompts = {b: rng.integers(100, min(vocab, 40000), (b, cfg.prompt_len)).astype(np.int64)
             for b in cfg.batches}
  torch_runs = [run_torch_baseline(cfg, prompts, t) for t in cfg.torch_threads] \
      if cfg.torch else []
  bandwidth = host_copy_bandwidth()
  nbytes = param_bytes(model)
  floors = {b: gemm_floor_step_s(model.config, b) for b in cfg.batches} if cfg.gemm_floor else {}
  rows, per_batch = [], {}
  for b in cfg.batches:
    ours = bench_decode(model, batch=b, prompt_len=cfg.prompt_len, new_tokens=cfg.new_tokens,
                        repeats=cfg.repeats, seed=0, tokens=prompts[b].astype(np.int32))
    ours_row0 = ours.pop("row0_tokens")
    entry: dict[str, Any] = {"qstar_jax": ours}
    best = None
    for run in torch_runs:
      theirs = dict(run["batches"][str(b)])
      row0 = theirs.pop("row0_tokens")
      theirs["threads"] = run["threads"]
      theirs["row0_greedy_tokens_agreeing"] = int(np.argmin(
          np.equal(ours_row0 + [-1], row0 + [-2])))
      entry.setdefault("transformers", []).append(theirs)
      if best is None or theirs["tokens_per_s"] > best["tokens_per_s"]:
        best = theirs
    if best is not None:
      entry["speedup_vs_fastest_transformers"] = ours["tokens_per_s"] / best["tokens_per_s"]
    if b in floors:
      entry["gemm_floor"] = dict(floors[b])
      if best is not None:
        entry["gemm_floor"]["max_speedup_vs_fastest_transformers"] = (
            floors[b]["tokens_per_s_bound"] / best["tokens_per_s"])
    per_batch[b] = entry
    target = {1: 1.5, 16: 3.0}.get(b)
    rows.append([b, ours["tokens_per_s"],
                 " / ".join(f"{t['tokens_per_s']:.3g} ({t['threads']}t)"
                            for t in entry.get("transformers", [])) or "-",
                 entry.get("speedup_vs_fastest_transformers", float("nan")),
                 f">= {target}x" if target else "-",
                 ours["prefill_s"], ours["step_ms"], ours["compile_s"]])
  limit = bandwidth / nbytes
  result = {
      "mode": "cpu", "config": dataclasses.asdict(cfg), "device": str(jax.devices()[0]),
      "param_bytes": nbytes, "copy_bandwidth_bytes_per_s": bandwidth,
      "bandwidth_limit_tokens_per_s_batch1": limit, "batches": per_batch,
      "torch": [{k: r[k] for k in ("threads", "torch")} for r in torch_runs],
      "load_average": os.getloadavg(), "cpu_count": os.cpu_count(),
  }
  if 1 in per_batch:
    b1 = per_batch[1]["qstar_jax"]
    result["batch1_fraction_of_bandwidth_limit"] = b1["decode_tokens_per_s"] / limit
  table = markdown_table(
      ["batch", "qstar_jax tok/s", "transformers tok/s (threads)", "speedup vs fastest",
       "target", "prefill s",
       "step ms", "compile s"], rows, floatfmt=".3g")
  table += (f"\nParameters {nbytes / 1e6:.1f} MB fp32; host copy bandwidth "
            f"{bandwidth / 1e9:.2f} GB/s (read + write) -> batch-1 limit {limit:.1f} tokens/s")
  if 1 in per_batch:
    table += (f"; batch-1 decode {per_batch[1]['qstar_jax']['decode_tokens_per_s']:.1f} tok/s "
              f"= {result['batch1_fraction_of_bandwidth_limit']:.0%} of it")
  if floors:
    table += ".\n\nGEMM floor (the step's weight matmuls alone, fp32, distinct weights; "\
             "bounds any decoder using this backend's GEMMs):\n\n"
    frows = []
    for b, fl in floors.items():
      mx = per_batch[b].get("gemm_floor", {}).get("max_speedup_vs_fastest_transformers")
      frows.append([b, fl["seconds"] * 1e3, fl["gflop"], fl["gflop_per_s"],
                    fl["tokens_per_s_bound"], "-" if mx is None else f"{mx:.3g}x"])
    table += markdown_table(["batch", "GEMM-only step ms", "GFLOP/step", "GFLOP/s",
                             "tok/s bound", "max speedup vs transformers"], frows,
                            floatfmt=".3g")
    table += "\n"
  else:
    table += ".\n"
  table += (f"Load average during the run: {', '.join(f'{x:.1f}' for x in os.getloadavg())}"
            f" on {os.cpu_count()} CPUs.\n")
  return result, table


def bench_gpu(cfg: BenchConfig) -> dict[str, Any]:
  bandwidth = device_copy_bandwidth()
  rows, runs = [], []
  for run in cfg.gpu_runs:
    spec, _, dtype = run.rpartition("@")
    if not spec or dtype not in ("bfloat16", "float32"):
      raise ValueError(f"gpu_runs entry {run!r}: expected MODEL@bfloat16 or MODEL@float32")
    model = _load(spec, dtype)
    res = bench_decode(model, batch=1, prompt_len=cfg.prompt_len,
                       new_tokens=cfg.gpu_new_tokens, repeats=cfg.repeats, seed=0)
    res.pop("row0_tokens", None)
    frac = res["weight_bytes_per_s"] / bandwidth
    runs.append({"model": spec, "dtype": dtype, **res, "fraction_of_hbm_limit": frac})
    rows.append([spec, dtype, res["param_bytes"] / 1e6, res["decode_tokens_per_s"],
                 res["step_ms"], res["weight_bytes_per_s"] / 1e9, frac, res["compile_s"]])
    print(markdown_table(["model", "dtype", "tok/s", "fraction of HBM limit"],
                         [[spec, dtype, res["decode_tokens_per_s"], frac]], floatfmt=".3g"),
          flush=True)
    del model
  result = {"mode": "gpu", "config": dataclasses.asdict(cfg), "device": str(jax.devices()[0]),
            "copy_bandwidth_bytes_per_s": bandwidth, "runs": runs}
  table = markdown_table(["model", "dtype", "param MB", "batch-1 tok/s", "step ms", "weight GB/s",
                          "fraction of HBM limit", "compile s"], rows, floatfmt=".3g")
  table += (f"\nDevice {jax.devices()[0].device_kind}; device copy bandwidth "
            f"{bandwidth / 1e9:.0f} GB/s (read + write). Target: >= 60% of the limit.\n")
  return result, table


def main(argv: list[str] | None = None) -> dict[str, Any]:
  cfg = parse_config(BenchConfig, sys.argv[1:] if argv is None else argv)
  result, table = bench_gpu(cfg) if cfg.gpu else bench_cpu(cfg)
  write_results(cfg.out, results=result, table_md=table)
  print(table)
  return result


if __name__ == "__main__":
  main()
