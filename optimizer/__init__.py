"""Optimizer: passes that read an artifact and write a new, quality-gated one next to it.

``python -m optimizer tiny-shakespeare --passes bf16,int8`` or, through the model-manager,
``POST /models/{name}/optimize {"passes": ["bf16", "int8"]}`` (an rq job). See ``passes`` for the
passes, ``quality`` for the gate and ``quant`` for the int8 format and its loader
(:func:`optimizer.quant.load_quantized`). Importing ``optimizer`` itself does not import torch;
``optimizer.passes.optimize`` does the work.
"""

from optimizer.plan import PASSES, GateFailed, OptimizeError, PassResult

__all__ = ["PASSES", "GateFailed", "OptimizeError", "PassResult"]
