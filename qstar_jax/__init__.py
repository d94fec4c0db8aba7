"""qstar_jax: value-guided multi-step reasoning in JAX.

Subpackages, each importing only from those before it:

- ``data``: data locations, GSM8K and tiny Shakespeare (local files or a checksummed download),
  tensorflow-datasets builders and grain pipelines.
- ``quant``: QuEST quantization math (block Hadamard, the Gaussian-MSE grid, trust gradient).
- ``kernels``: Pallas kernels (int8 / packed-int4 matmul, fused Hadamard+quantize) beside their
  jnp references, and the dispatcher.
- ``models``: Llama/Qwen2 transformers (NNX), value heads, KV-cache decoding, weight loading
  (HF safetensors, GGUF), tokenizers, puzzle networks.
- ``envs``: batched pure-JAX puzzles (Rubik's cube, n-puzzle), answer grading.
- ``search``: A* and Q* puzzle search; the library step rollout over LM reasoning steps.
- ``losses``: LM token log-likelihoods, DAVI / deep Q-learning targets.
- ``training``: the training loop, optimizers, orbax checkpoints, metrics, puzzle training.
- ``benchmarks``: decode benchmarks shared by the CLI and the experiments.

Planned (not in the package yet): MCTS, value-guided beam search, best-of-N and particle
filtering over reasoning steps with a tree KV cache; OREO, DPO / step-level DPO and implicit-PRM
losses and training; multi-device meshes.
"""

__version__ = "0.1.0"
