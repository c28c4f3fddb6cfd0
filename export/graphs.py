"""Small helpers for rewriting ONNX graphs in place (used by dequantize, attention and int8)."""
from __future__ import annotations

import collections
from typing import Any

import numpy as np


class GraphIndex:
    """Lookup tables over one ONNX graph: constants (initializers and Constant nodes) by name, the node that
    produces each tensor, and the nodes that read it. Rebuild it after changing the graph."""

    def __init__(self, model: Any):
        from onnx import numpy_helper

        self.model = model
        self.graph = model.graph
        self.initializers = {init.name: init for init in self.graph.initializer}
        self.constant_nodes: dict[str, np.ndarray] = {}
        for node in self.graph.node:
            if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
                self.constant_nodes[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        self.producer = {out: node for node in self.graph.node for out in node.output if out}
        self.consumers: dict[str, list[Any]] = collections.defaultdict(list)
        for node in self.graph.node:
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
        self.outputs = {out.name for out in self.graph.output}

    def constant(self, name: str) -> np.ndarray | None:
        """The value of a constant tensor, or None when `name` is computed at run time."""
        from onnx import numpy_helper

        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        return self.constant_nodes.get(name)

    def only_consumer(self, name: str, op_type: str | None = None) -> Any | None:
        """The single node reading `name` (of `op_type`, when given), or None; a graph output never qualifies."""
        users = self.consumers.get(name, [])
        if len(users) != 1 or name in self.outputs:
            return None
        return users[0] if op_type is None or users[0].op_type == op_type else None

    def unique_name(self, wanted: str) -> str:
        name, number = wanted, 1
        while name in self.initializers or name in self.producer:
            name, number = f"{wanted}_{number}", number + 1
        return name

    def add_initializer(self, wanted: str, values: np.ndarray) -> str:
        """Add a constant under a fresh name (derived from `wanted`) and return the name."""
        from onnx import numpy_helper

        name = self.unique_name(wanted)
        init = numpy_helper.from_array(np.asarray(values), name)
        self.graph.initializer.append(init)
        self.initializers[name] = init
        return name


def node_attribute(node: Any, name: str, default: Any = None) -> Any:
    """The value of a node's attribute `name`, or `default` when the node does not set it."""
    import onnx

    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def node_key(node: Any) -> tuple[str, str]:
    """A stable identity for a node (protobuf wrappers are recreated on access, so id() is not stable)."""
    return node.name, node.output[0] if node.output else ""


def remove_dead_nodes(model: Any) -> None:
    """Drop nodes whose outputs nobody reads (repeatedly), then initializers and graph inputs nobody uses."""
    graph = model.graph
    wanted = {out.name for out in graph.output}
    nodes = list(graph.node)
    while True:
        used = set(wanted)
        for node in nodes:
            used.update(node.input)
        kept = [node for node in nodes if any(out in used for out in node.output if out)]
        if len(kept) == len(nodes):
            break
        nodes = kept
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in nodes for name in node.input} | wanted
    initializer_names = {init.name for init in graph.initializer}
    keep = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    inputs = [i for i in graph.input if i.name in used or i.name not in initializer_names]
    del graph.input[:]
    graph.input.extend(inputs)


def ensure_opset(model: Any, domain: str, version: int) -> None:
    """Declare `domain` at `version` or higher."""
    from onnx import helper

    for entry in model.opset_import:
        if entry.domain == domain or (domain == "" and entry.domain == "ai.onnx"):
            entry.version = max(entry.version, version)
            return
    model.opset_import.append(helper.make_opsetid(domain, version))


def default_opset(model: Any) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
