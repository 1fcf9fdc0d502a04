"""The benchmark behind ``tools/bench.py``: every real model x every configuration (onnxsparse
pipelines and peers), one isolated, cached cell each, rendered as Markdown tables.

Modules: ``configs`` (the rows), ``cell`` (one cell, in its own process), ``measure`` (size, parameters,
latency), ``peer`` (onnxruntime's quantizer and onnxsim, run in the peers venv), ``table`` (Markdown).
Importing the package and ``configs``/``table`` needs only the standard library.
"""
