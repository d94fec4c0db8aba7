"""Experiments: one module per reproduced table, run as ``python -m experiments.NAME key=value``.

Each takes ``[preset=NAME] out=DIR key=value ...`` (presets in ``experiments/presets/NAME/``)
and writes ``DIR/results.json``, ``DIR/table.md`` and plots.
"""
