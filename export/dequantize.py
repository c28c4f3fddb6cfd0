"""Rebuild an fp32 graph from a dynamically quantized (int8) one, so that an int8-only source (like the
packaged ms-marco reranker) can be fused and re-quantized like an fp32 export.

Patterns undone:

- weights, as ONNX Runtime's `quantize_dynamic` writes them: ``DynamicQuantizeLinear(X) -> MatMulInteger(Xq, Wq,
  x_zp, w_zp) -> Cast -> Mul(., x_scale * w_scale)`` becomes ``MatMul(X, W)`` with ``W = (Wq - w_zp) * w_scale``
  (per-tensor or per-column scales);
- weights, as this exporter's int8 step writes them: ``QuantizeLinear(X) -> MatMulIntegerToFloat(Xq, Wq, ...,
  bias)`` becomes ``MatMul(X, W)`` (+ ``Add(bias)``);
- embedding tables: ``Gather(Tq, ids) -> DequantizeLinear(., scale, zp)`` becomes ``Gather(T, ids)`` with
  ``T = (Tq - zp) * scale`` (per-tensor scale), and a DequantizeLinear of constants becomes a constant.

The weights of the result are exactly the int8 source's weights, dequantized: only the source's activation
rounding is gone (on ms-marco-MiniLM-L-12-v2 the rebuilt graph scores the calibration pairs within 0.56 logit of
the source, Spearman 0.995; that is the size of the source's own activation-quantization noise).
"""
from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ExportError
from .graphs import GraphIndex, node_key, remove_dead_nodes

# Operators that must not survive the rewrite.
QUANTIZED_LEFTOVERS = {"MatMulInteger", "DynamicQuantizeLinear", "DequantizeLinear", "QuantizeLinear",
                       "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QAttention", "QGemm", "ConvInteger"}


def dequantized(values: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None) -> np.ndarray:
    """(values - zero_point) * scale in float32 (computed in float64)."""
    shifted = values.astype(np.float64) - (0.0 if zero_point is None else zero_point.astype(np.float64))
    return (shifted * scale.astype(np.float64)).astype(np.float32)


def _plain_name(quantized_name: str) -> str:
    for suffix in ("_quantized", "_quant"):
        if quantized_name.endswith(suffix):
            return quantized_name[: -len(suffix)]
    return quantized_name + "_fp32"


def _scalar_or_vector(values: np.ndarray) -> np.ndarray:
    return values.reshape(()) if values.size == 1 else values.reshape(-1)


def _rewrite_matmul_integer(index: GraphIndex, node: Any) -> tuple[list[Any], Any] | None:
    """(nodes replaced, new MatMul) for one MatMulInteger chain, or None when it is not the expected pattern."""
    import onnx

    if len(node.input) < 2:
        return None
    dql = index.producer.get(node.input[0])
    weights = index.constant(node.input[1])
    if dql is None or dql.op_type != "DynamicQuantizeLinear" or weights is None or weights.ndim != 2:
        return None
    if len(node.input) > 2 and node.input[2] and node.input[2] != dql.output[2]:
        return None  # the activation zero point must be the one DynamicQuantizeLinear computed
    has_w_zp = len(node.input) > 3 and bool(node.input[3])
    w_zp = index.constant(node.input[3]) if has_w_zp else None
    cast = index.only_consumer(node.output[0], "Cast")
    mul = index.only_consumer(cast.output[0], "Mul") if cast is not None else None
    if cast is None or mul is None or (has_w_zp and w_zp is None):
        return None
    scale_name = mul.input[1] if mul.input[0] == cast.output[0] else mul.input[0]
    scale_mul = index.producer.get(scale_name)
    if scale_mul is None or scale_mul.op_type != "Mul" or dql.output[1] not in scale_mul.input:
        return None
    w_scale = index.constant(scale_mul.input[1] if scale_mul.input[0] == dql.output[1] else scale_mul.input[0])
    if w_scale is None or w_scale.size not in (1, weights.shape[1]):
        return None
    fp32 = dequantized(weights, _scalar_or_vector(w_scale), None if w_zp is None else _scalar_or_vector(w_zp))
    name = index.add_initializer(_plain_name(node.input[1]), fp32)
    matmul = onnx.helper.make_node("MatMul", [dql.input[0], name], [mul.output[0]], name=_plain_name(node.name))
    return [node, cast, mul], matmul


def _rewrite_matmul_integer_to_float(index: GraphIndex, node: Any) -> tuple[list[Any], Any | list[Any]] | None:
    """(nodes replaced, new nodes...) for QuantizeLinear -> MatMulIntegerToFloat, or None."""
    import onnx

    inputs = list(node.input) + [""] * (7 - len(node.input))
    quantize = index.producer.get(inputs[0])
    weights = index.constant(inputs[1])
    w_scale = index.constant(inputs[3])
    w_zp = index.constant(inputs[5]) if inputs[5] else None
    if (quantize is None or quantize.op_type != "QuantizeLinear" or weights is None or weights.ndim != 2
            or w_scale is None or (inputs[5] and w_zp is None) or inputs[2] != quantize.input[1]):
        return None
    fp32 = dequantized(weights, _scalar_or_vector(w_scale), None if w_zp is None else _scalar_or_vector(w_zp))
    name = index.add_initializer(_plain_name(inputs[1]), fp32)
    if not inputs[6]:
        return [node], onnx.helper.make_node("MatMul", [quantize.input[0], name], [node.output[0]],
                                             name=_plain_name(node.name))
    product = index.unique_name(node.output[0] + "_matmul")
    return [node], [onnx.helper.make_node("MatMul", [quantize.input[0], name], [product], name=_plain_name(node.name)),
                    onnx.helper.make_node("Add", [product, inputs[6]], [node.output[0]], name=node.name + "_bias")]


def _rewrite_dequantize_linear(index: GraphIndex, node: Any) -> tuple[list[Any], Any] | None:
    """(nodes replaced, new node) for Gather(Tq) -> DequantizeLinear or a DequantizeLinear of constants."""
    import onnx

    scale = index.constant(node.input[1])
    has_zp = len(node.input) > 2 and bool(node.input[2])
    zero = index.constant(node.input[2]) if has_zp else None
    if scale is None or (has_zp and zero is None):
        return None
    values = index.constant(node.input[0])
    if values is not None:
        shape = [1] * values.ndim
        if scale.size > 1:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            if any(a.name == "block_size" and a.i for a in node.attribute):
                return None
            shape[axis] = scale.size
        fp32 = dequantized(values, scale.reshape(shape), None if zero is None else zero.reshape(shape))
        name = index.add_initializer(_plain_name(node.input[0]), fp32)
        return [node], onnx.helper.make_node("Identity", [name], [node.output[0]], name=node.name + "_folded")
    gather = index.producer.get(node.input[0])
    if gather is None or gather.op_type != "Gather" or scale.size != 1 or index.only_consumer(gather.output[0]) is None:
        return None
    table = index.constant(gather.input[0])
    if table is None:
        return None
    fp32 = dequantized(table, scale.reshape(()), None if zero is None else zero.reshape(()))
    name = index.add_initializer(_plain_name(gather.input[0]), fp32)
    axis = next((a.i for a in gather.attribute if a.name == "axis"), 0)
    return [gather, node], onnx.helper.make_node("Gather", [name, gather.input[1]], [node.output[0]],
                                                 name=gather.name, axis=axis)


def dequantize_model(src: Path, dst: Path) -> dict[str, Any]:
    """Write dst: src with every recognized int8 pattern replaced by its fp32 equivalent. Raises ExportError
    when quantized operators remain (a pattern this rewrite does not know). Returns a record of the rewrite."""
    import onnx

    model = onnx.load(str(src))
    index = GraphIndex(model)
    position = {node_key(node): i for i, node in enumerate(model.graph.node)}
    removed: set[int] = set()
    added: dict[int, list[Any]] = collections.defaultdict(list)  # new node goes where its last old node was
    counts: collections.Counter[str] = collections.Counter()
    for node in list(model.graph.node):
        rewrite = {"MatMulInteger": _rewrite_matmul_integer, "MatMulIntegerToFloat": _rewrite_matmul_integer_to_float,
                   "DequantizeLinear": _rewrite_dequantize_linear}.get(node.op_type)
        result = rewrite(index, node) if rewrite else None
        if result is None:
            continue
        old, new = result
        places = [position[node_key(n)] for n in old]
        removed.update(places)
        added[max(places)].extend(new if isinstance(new, list) else [new])
        counts[node.op_type] += 1
    nodes = []
    for i, node in enumerate(model.graph.node):
        if i not in removed:
            nodes.append(node)
        nodes.extend(added.get(i, []))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    remove_dead_nodes(model)
    left = sorted({n.op_type for n in model.graph.node
                   if n.op_type in QUANTIZED_LEFTOVERS or n.op_type.startswith("QLinear")})
    if left:
        raise ExportError(f"{src}: cannot rebuild an fp32 graph: quantized operators {left} are not in a pattern "
                          "this exporter recognizes (dynamic int8 MatMulInteger chains, DequantizeLinear)")
    del model.graph.value_info[:]  # shapes of removed tensors; later steps infer what they need
    model.producer_name, model.producer_version = "twostage-dequantize", "1"
    onnx.save(model, str(dst))
    return {"tool": "twostage dequantize", "rewritten": dict(sorted(counts.items()))}
