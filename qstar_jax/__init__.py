"""qstar_jax: value-guided multi-step reasoning in JAX.

Subpackages: ``models`` (Llama-family policy/value transformers, decoding, weight loading),
``envs`` (batched pure-JAX environments), ``search`` (Q*, A*, MCTS, beam search),
``losses`` (OREO, DPO, DQN targets), ``quant`` (QuEST), ``training``, ``data`` and
``kernels`` (Pallas kernels).
"""

__version__ = "0.1.0"
