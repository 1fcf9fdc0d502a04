"""``qdq``: int8 quantization by QuantizeLinear/DequantizeLinear pairs that onnxruntime fuses into int8 kernels.

- ``rules``: what onnxruntime runs on int8, op by op (teach the pass a new op here);
- ``plan``: which nodes and activations are quantized, decided on the unmodified graph;
- ``materialize``: the Q/DQ pairs, int8 weights and int32 biases, and the dynamic int8 forms;
- ``guard``: the fewest nodes kept float that bring the model within tolerance;
- ``quantize``: the pass itself (calibration, bias correction, static/dynamic/auto, never slower).
"""

from .quantize import Qdq

__all__ = ["Qdq"]
