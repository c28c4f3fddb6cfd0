"""Compute only what a first-token (CLS) readout needs: an exact graph rewrite for cross-encoders.

A BERT cross-encoder scores a pair from the final hidden state of its first token (pooler: Gather index 0 on
the sequence axis, then dense, tanh, classifier). Past the last attention, every op is row-wise: position i
of its output depends only on position i of its inputs (the projections, residual adds, layer norms, Gelu).
So after the last attention only row 0 is needed, and that attention itself only needs row 0 of its queries
(all keys and values stay). The rewrite slices those tensors to their first row, [batch, seq, hidden] ->
[batch, 1, hidden], and the last layer's mask to its first query row. Outputs are unchanged up to float
rounding; the last layer's output projection, feed-forward block and most of its attention are skipped
(one of 12 layers for ms-marco-MiniLM-L-12: about 7 % of the model's time, measured in docs/benchmarks.md).

Which tensors qualify is decided backwards from the readout, never by matching a fixed pattern: a tensor is
"first-row only" when every reader either reads position 0 (the readout Gather), is a row-wise op whose
outputs are all first-row only, or is an attention reading it as queries whose output is first-row only.
A row-wise op reading a tensor that is also needed in full gets a Slice of it. Graphs without such a readout
(bi-encoders return every token) are left as they are.

The export applies it to the served graphs after int8 calibration (`rewrite_file`), so activation scales are
those of the full graph and the int8 model computes exactly what it did before, for fewer rows; static
QuantizeLinear and MatMulIntegerToFloat count as row-wise, a dynamic (whole-tensor) quantization does not.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .graphs import GraphIndex, node_attribute

# Elementwise and last-axis ops: output row i depends only on row i of each [batch, seq, hidden] input, given
# constants that are the same for every position (checked in `_Analysis.row_wise`).
ROW_WISE = {
    ("", "Add"), ("", "Sub"), ("", "Mul"), ("", "Div"), ("", "LayerNormalization"),
    ("", "Gelu"), ("", "Relu"), ("", "Tanh"), ("", "Erf"), ("", "Sqrt"), ("", "Pow"), ("", "Cast"),
    ("", "Sigmoid"), ("com.microsoft", "Gelu"), ("com.microsoft", "FastGelu"), ("com.microsoft", "BiasGelu"),
    ("com.microsoft", "SkipLayerNormalization"), ("", "QuantizeLinear"), ("", "DequantizeLinear"),
}
# Matrix products of a run-time [batch, seq, k] input with constant weights (and constant quantization
# parameters), int8 forms included.
MATMULS = {("", "MatMul"), ("", "MatMulInteger"), ("com.microsoft", "MatMulIntegerToFloat")}
SEQUENCE_AXIS = 1
SLICE_SUFFIX = "_first_token"


def _ranks(model: Any) -> dict[str, int]:
    """Tensor ranks from ONNX shape inference (tensors it cannot type are missing)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001 - shape inference is best effort; no ranks means no rewrite
        return {}
    ranks: dict[str, int] = {}
    for info in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        t = info.type.tensor_type
        if t.HasField("shape"):
            ranks[info.name] = len(t.shape.dim)
    return ranks


def _constant_broadcasts_per_row(value: np.ndarray) -> bool:
    """A constant operand that is the same for every position: at most the last axis is wider than 1."""
    return all(d == 1 for d in value.shape[:-1])


class _Analysis:
    def __init__(self, model: Any):
        self.index = GraphIndex(model)
        self.ranks = _ranks(model)
        self.first_only: dict[str, bool] = {}
        self._fill_ranks(model)

    def _fill_ranks(self, model: Any) -> None:
        """Shape inference gives up on some contrib ops (MatMulIntegerToFloat); a matrix product or an
        elementwise op keeps the rank of its run-time input."""
        for node in model.graph.node:
            key = (node.domain or "", node.op_type)
            if not node.output or node.output[0] in self.ranks or (key not in ROW_WISE and key not in MATMULS):
                continue
            known = [self.ranks[name] for name in node.input
                     if name and name in self.ranks and not self.is_constant(name)]
            if known:
                self.ranks[node.output[0]] = max(known)

    def is_constant(self, name: str) -> bool:
        return self.index.constant(name) is not None

    def sequence_tensor(self, name: str) -> bool:
        return self.ranks.get(name) == 3

    def readout(self, node: Any, tensor: str) -> bool:
        """`node` reads position 0 of `tensor` on the sequence axis and nothing else of it."""
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or node.input[0] != tensor:
            return False
        indices = self.index.constant(node.input[1])
        axis = node_attribute(node, "axis", 0)
        rank = self.ranks.get(tensor)
        return (indices is not None and indices.ndim == 0 and int(indices) == 0 and rank == 3
                and axis in (SEQUENCE_AXIS, SEQUENCE_AXIS - rank))

    def row_wise(self, node: Any) -> bool:
        key = (node.domain or "", node.op_type)
        if key in MATMULS:
            weights = self.index.constant(node.input[1]) if len(node.input) > 1 else None
            return (weights is not None and weights.ndim == 2 and self.sequence_tensor(node.input[0])
                    and all(self.is_constant(name) for name in node.input[2:] if name))
        if key not in ROW_WISE:
            return False
        if node.op_type == "LayerNormalization" and node_attribute(node, "axis", -1) not in (-1, 2):
            return False
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and node_attribute(node, "axis", 1) not in (-1, 2):
            scale = self.index.constant(node.input[1])
            if scale is None or scale.size != 1:
                return False  # per-axis scales along another axis than the hidden one
        for name in node.input:
            if not name:
                continue
            value = self.index.constant(name)
            if value is None and not self.sequence_tensor(name):
                return False
            if value is not None and not _constant_broadcasts_per_row(value):
                return False
        return all(self.sequence_tensor(out) for out in node.output[:1])

    def query_of_attention(self, node: Any, tensor: str) -> bool:
        """`tensor` is the query (and only the query) of an ONNX Attention with 3-D inputs whose output is
        first-row only and whose mask, if any, is [batch, heads or 1, q_seq, kv_seq]."""
        if node.op_type != "Attention" or node.domain not in ("", "ai.onnx") or len(node.output) != 1:
            return False
        inputs = list(node.input)
        if inputs[0] != tensor or tensor in inputs[1:] or any(inputs[4:]):
            return False
        if not self.first_only.get(node.output[0]):
            return False
        mask = inputs[3] if len(inputs) > 3 else ""
        return all(self.sequence_tensor(name) for name in inputs[:3]) and (not mask or self.ranks.get(mask) == 4)

    def node_outputs_first_only(self, node: Any) -> bool:
        used = [o for o in node.output if o and (self.index.consumers.get(o) or o in self.index.outputs)]
        return bool(used) and all(self.first_only.get(o) for o in used) and bool(self.first_only.get(node.output[0]))

    def decide(self, tensor: str) -> bool:
        if tensor in self.index.outputs or not self.sequence_tensor(tensor):
            return False
        readers = self.index.consumers.get(tensor, [])
        if not readers:
            return False
        for node in readers:
            if self.readout(node, tensor):
                continue
            if self.query_of_attention(node, tensor):
                continue
            if self.row_wise(node) and self.node_outputs_first_only(node):
                continue
            return False
        return True


def slice_to_first_token(model: Any) -> dict[str, int]:
    """Rewrite `model` in place (module docstring); returns counts of the tensors sliced and the attentions
    narrowed (all zero when the graph has no first-token readout)."""
    from onnx import helper

    analysis = _Analysis(model)
    index = analysis.index
    nodes = list(model.graph.node)
    gathers = [n for n in nodes if n.op_type == "Gather" and n.input]
    if not analysis.ranks or not any(analysis.readout(n, n.input[0]) for n in gathers):
        return {"tensors_sliced": 0, "attentions_narrowed": 0}
    for node in reversed(nodes):  # readers come after producers: decide them first
        for out in node.output:
            if out:
                analysis.first_only[out] = analysis.decide(out)

    # Where a first-row-only consumer reads a tensor that is needed in full, it reads a slice instead.
    start = end = None  # the Slice bounds [0, 1), shared by every slice
    slices: dict[str, str] = {}
    new_nodes: list[Any] = []
    narrowed = 0

    def sliced(tensor: str, axis: int) -> str:
        nonlocal start, end
        key = f"{tensor}@{axis}"
        quantize = index.producer.get(tensor)
        if (key not in slices and axis == SEQUENCE_AXIS and quantize is not None
                and quantize.op_type == "QuantizeLinear"
                and all(analysis.is_constant(name) for name in quantize.input[1:] if name)):
            # Quantize the slice rather than slice the quantized tensor (same values): the graph keeps the
            # QuantizeLinear -> MatMulIntegerToFloat pattern that dequantize.py reads back.
            name = index.unique_name(f"{tensor}{SLICE_SUFFIX}")
            new_nodes.append(helper.make_node("QuantizeLinear", [sliced(quantize.input[0], axis), *quantize.input[1:]],
                                              [name], name=index.unique_name(f"{name}_QuantizeLinear"),
                                              **{a.name: helper.get_attribute_value(a) for a in quantize.attribute}))
            slices[key] = name
        if key not in slices:
            if start is None:
                start = index.add_initializer("first_token_start", np.array([0], dtype=np.int64))
                end = index.add_initializer("first_token_end", np.array([1], dtype=np.int64))
            axes = index.add_initializer(f"first_token_axis{axis}", np.array([axis], dtype=np.int64))
            name = index.unique_name(f"{tensor}{SLICE_SUFFIX}")
            new_nodes.append(helper.make_node("Slice", [tensor, start, end, axes], [name],
                                              name=index.unique_name(f"{name}_Slice")))
            slices[key] = name
        return slices[key]

    # Decide every node before any input is renamed.
    narrows = {id(n) for n in nodes if n.op_type == "Attention" and analysis.query_of_attention(n, n.input[0])}
    first_only_consumers = narrows | {id(n) for n in nodes
                                      if analysis.row_wise(n) and analysis.node_outputs_first_only(n)}
    # Tensors that come out narrowed: those of the nodes above. Any other input such a node reads (computed in
    # full by an op that mixes positions, or a graph input) gets sliced, even if only its first row is used.
    narrow_outputs = {out for n in nodes if id(n) in first_only_consumers for out in n.output if out}
    rewritten = []
    for node in nodes:
        narrows_attention = id(node) in narrows
        if id(node) in first_only_consumers:
            for position, name in enumerate(node.input):
                if not name or analysis.is_constant(name) or name in narrow_outputs:
                    continue
                if narrows_attention and position in (1, 2):
                    continue  # keys and values: every position
                axis = 2 if narrows_attention and position == 3 else SEQUENCE_AXIS  # mask: its query axis
                node.input[position] = sliced(name, axis)
            narrowed += int(narrows_attention)
        rewritten.extend(new_nodes)
        new_nodes.clear()
        rewritten.append(node)
    del model.graph.node[:]
    model.graph.node.extend(rewritten)
    # Shapes recorded for the narrowed tensors say [batch, seq, ...]; left in, ONNX Runtime's memory planner
    # warns on every run that they do not match.
    stale = [info for info in model.graph.value_info if info.name in narrow_outputs]
    for info in stale:
        model.graph.value_info.remove(info)
    return {"tensors_sliced": len(slices), "attentions_narrowed": narrowed}


def rewrite_file(path: Path) -> dict[str, int]:
    """Apply `slice_to_first_token` to an ONNX file in place (written beside, then renamed)."""
    import os

    import onnx

    model = onnx.load(str(path))
    counts = slice_to_first_token(model)
    if counts["tensors_sliced"]:
        staging = path.with_name(path.name + ".first-token.tmp")
        onnx.save(model, str(staging))
        onnx.checker.check_model(str(staging))
        os.replace(staging, path)
    return counts
