"""``qdq``: int8 quantization by QuantizeLinear/DequantizeLinear pairs that onnxruntime fuses into int8 kernels.

- ``rules``: what onnxruntime runs on int8, op by op (teach the pass a new op here);
- ``plan``: which nodes and activations are quantized, decided on the unmodified graph;
- ``materialize``: the Q/DQ pairs, int8 weights and int32 biases (a static model built for any set of nodes
  kept float), and the dynamic int8 forms;
- ``bias_correction``: each layer's bias shifted so that its mean int8 output matches float;
- ``guard``: the fewest nodes kept float that bring the model within tolerance;
- ``quantize``: the pass itself (calibration, static/dynamic/auto, never slower).
"""

from .quantize import Qdq

__all__ = ["Qdq"]
