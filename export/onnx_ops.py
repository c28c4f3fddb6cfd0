"""The ONNX steps of an export: checkpoint -> ONNX (optimum), inspection and validation, graph optimization.
Heavy imports (torch, optimum, onnx, onnxruntime) happen inside functions. Quantization is in `int8`, the
rebuild of an fp32 graph from an int8 source in `dequantize`, the attention rewrite in `attention`.

Graph optimization (`optimize_fp32`), measured with ONNX Runtime 1.32 on an AVX-512 VNNI / AMX CPU, one thread,
16 sequences of ~96 tokens, hidden size 384:

- the graph is first converted to opset 23 (onnx.version_converter), so that attention can use the standard
  ONNX `Attention` operator (see `attention`: 7.5 ms vs 10.2 ms for com.microsoft.MultiHeadAttention);
- onnxruntime.transformers' BERT fusions run with only MultiHeadAttention, LayerNormalization and Gelu enabled.
  SkipLayerNormalization (5.0 ms vs 1.2 ms for Add + LayerNormalization), BiasGelu (6.0 ms vs 3.1 ms for Gelu
  with the bias folded into the int8 matmul) and the fused Attention operator (its QKV projection cannot be
  quantized by the int8 step) are slower here;
- the result is checked against the unfused graph by the pipeline; fusions are exact to ~1e-5.
"""
from __future__ import annotations

import collections
import contextlib
import io
import logging
import os
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ExportError

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
REQUIRED_INPUTS = ("input_ids", "attention_mask")
# Node types that only appear in an already-quantized graph.
QUANTIZED_OPS = {
    "MatMulInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "ConvInteger",
    "QAttention", "QEmbedLayerNormalization", "QGemm", "QuantizeLinear", "DequantizeLinear",
}


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence the chatty warnings of torch tracing, transformers, optimum and the ORT quantizer."""
    names = ("transformers", "optimum", "onnxruntime", "root", "torch", "onnxscript", "torch.onnx")
    saved = {name: logging.getLogger(None if name == "root" else name).level for name in names}
    try:
        for name in names:
            logging.getLogger(None if name == "root" else name).setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(None if name == "root" else name).setLevel(level)


@dataclass(frozen=True)
class OnnxInfo:
    path: Path
    inputs: list[str]
    outputs: list[tuple[str, int]]  # (name, rank; -1 when unknown)
    opset: int
    op_counts: dict[str, int]

    @property
    def quantized(self) -> bool:
        return any(op in QUANTIZED_OPS or op.startswith("QLinear") for op in self.op_counts)


def inspect_onnx(path: Path) -> OnnxInfo:
    """Inputs, outputs, default-domain opset and node counts of an ONNX file (weights not loaded)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ExportError(f"{path}: not a readable ONNX model: {exc}") from exc
    initializers = {init.name for init in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in initializers]
    outputs = []
    for out in model.graph.output:
        shape = out.type.tensor_type.shape if out.type.HasField("tensor_type") else None
        rank = len(shape.dim) if shape is not None and out.type.tensor_type.HasField("shape") else -1
        outputs.append((out.name, rank))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    counts = collections.Counter(node.op_type for node in model.graph.node)
    return OnnxInfo(Path(path), inputs, outputs, opset, dict(counts))


def position_table_size(path: Path) -> int | None:
    """Rows of the position-embedding table (the longest input the graph accepts), found by initializer
    name; None when the graph has no recognizable table."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for init in model.graph.initializer:
        if "position_embeddings" in init.name and len(init.dims) == 2:
            return int(init.dims[0])
    return None


def check_onnx(path: Path) -> None:
    """onnx.checker on the file (by path, so large models with external data work)."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise ExportError(f"{path}: fails onnx.checker: {str(exc)[:500]}") from exc


def served_output(info: OnnxInfo, role: str) -> str:
    """Check the graph's inputs and pick the output the server reads; errors name the file."""
    missing = [name for name in REQUIRED_INPUTS if name not in info.inputs]
    unknown = [name for name in info.inputs if name not in MODEL_INPUTS]
    if missing or unknown:
        raise ExportError(f"{info.path}: inputs {info.inputs}; need {list(REQUIRED_INPUTS)} "
                          f"(optionally token_type_ids), missing {missing}, not understood {unknown}")
    names = [name for name, _ in info.outputs]
    if role == "bi-encoder":
        if "last_hidden_state" in names:
            return "last_hidden_state"
        rank3 = [name for name, rank in info.outputs if rank == 3]
        if rank3:
            return rank3[0]
        raise ExportError(f"{info.path}: outputs {names}; a bi-encoder must output token embeddings "
                          "[batch, sequence, hidden] (last_hidden_state): pooling is applied by the server")
    if "logits" in names:
        return "logits"
    ranked = [name for name, rank in info.outputs if rank in (1, 2)]
    if ranked:
        return ranked[0]
    raise ExportError(f"{info.path}: outputs {names}; a cross-encoder must output logits [batch, labels]")


def export_checkpoint(checkpoint: Path, out_dir: Path, role: str, opset: int | None) -> Path:
    """Export a Hugging Face checkpoint with optimum: feature-extraction (token embeddings) for the
    bi-encoder, text-classification (logits) for the cross-encoder. Returns the ONNX path."""
    try:
        from optimum.exporters.onnx import main_export
    except ImportError as exc:
        raise ExportError("exporting a checkpoint needs the export extras (torch, transformers, optimum-onnx): "
                          "pip install 'twostage[export]'") from exc
    task = "feature-extraction" if role == "bi-encoder" else "text-classification"
    out_dir.mkdir(parents=True, exist_ok=True)
    with quiet_libraries():
        try:
            main_export(str(checkpoint), output=str(out_dir), task=task, opset=opset, device="cpu",
                        library_name="transformers", do_validation=True, local_files_only=True)
        except Exception as exc:
            raise ExportError(f"{checkpoint}: ONNX export (optimum, task {task}) failed: "
                              f"{exc.__class__.__name__}: {str(exc)[:800]}") from exc
    path = out_dir / "model.onnx"
    if not path.is_file():
        raise ExportError(f"{checkpoint}: optimum did not write {path}")
    return path


FUSION_TOOL = "onnxruntime.transformers.optimizer"


@contextlib.contextmanager
def working_directory(path: Path) -> Iterator[None]:
    """Run a step with `path` as the current directory: some ONNX tools write scratch files (e.g. symbolic shape
    inference's sym_shape_infer_temp.onnx plus a <uuid>.data file) into the current directory."""
    previous = os.getcwd()
    Path(path).mkdir(parents=True, exist_ok=True)
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def fusion_options() -> Any:
    """The BERT fusions that pay off on CPU (module docstring): MultiHeadAttention, LayerNorm, Gelu."""
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions("bert")
    options.use_multi_head_attention = True
    options.enable_skip_layer_norm = False
    options.enable_bias_skip_layer_norm = False
    options.enable_bias_gelu = False
    options.enable_embed_layer_norm = False
    return options


def to_opset(src: Path, dst: Path, version: int) -> str | None:
    """Convert src to `version` with onnx.version_converter; returns None on success, else why it failed."""
    import onnx
    from onnx import version_converter

    model = onnx.load(str(src))
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if current >= version:
        shutil.copyfile(src, dst)
        return None
    ranked = with_softmax_ranks(model) if current < 13 else None
    try:
        converted = version_converter.convert_version(ranked or model, version)
        if ranked is not None:
            del converted.graph.value_info[:]  # only there for the converter; ONNX Runtime infers its own
        onnx.checker.check_model(converted)
    except Exception as exc:
        return f"{exc.__class__.__name__}: {str(exc)[:200]}"
    onnx.save(converted, str(dst))
    return None


def with_softmax_ranks(model: Any) -> Any | None:
    """The model with inferred shapes, when it has Softmax nodes (None otherwise, or when inference fails).

    Below opset 13 Softmax flattens its input to 2-D at `axis`; the version converter keeps that meaning by
    wrapping each Softmax in Flatten/Reshape unless it knows the input's rank and sees that `axis` is the last
    one. Such a wrapped Softmax hides the attention pattern from the fusions (the packaged opset-11
    bge-small-en-v1.5 lost all 12 attention fusions), and ONNX's own shape inference does not get the rank
    through the Shape/Concat/Reshape chains of these exports; ONNX Runtime's symbolic shape inference does."""
    if not any(node.op_type in ("Softmax", "LogSoftmax", "Hardmax") for node in model.graph.node):
        return None
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    try:
        with quiet_libraries(), contextlib.redirect_stdout(io.StringIO()):
            return SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception:  # the plain conversion still works, only without the rank
        return None


def optimize_fp32(src: Path, dst: Path, work: Path, model_type: str | None) -> dict[str, Any]:
    """The fp32 graph to serve or quantize: opset 23, CPU-friendly BERT fusions, ONNX Attention (module
    docstring). Patterns that do not match leave the graph as is. Returns a record of what was done."""
    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    from .attention import ATTENTION_OPSET, to_onnx_attention
    from .graphs import ensure_opset, remove_dead_nodes

    work.mkdir(parents=True, exist_ok=True)
    converted = work / "opset.onnx"
    failure = to_opset(src, converted, ATTENTION_OPSET)
    start = src if failure else converted
    # redirect_stdout: the optimizer prints "failed in shape inference" when ONNX shape inference gives up on a
    # fused (com.microsoft) node; the fusions do not need it.
    with quiet_libraries(), working_directory(work), contextlib.redirect_stdout(io.StringIO()):
        try:
            optimized = optimize_model(str(start), model_type="bert", opt_level=0, use_gpu=False,
                                       optimization_options=fusion_options())
        except Exception as exc:
            raise ExportError(f"{src}: transformer graph optimization failed: {exc}") from exc
        stats = optimized.get_fused_operator_statistics()
    model = optimized.model
    attention = to_onnx_attention(model)
    remove_dead_nodes(model)
    if any(node.domain == "com.microsoft" for node in model.graph.node):
        ensure_opset(model, "com.microsoft", 1)
    onnx.save(model, str(dst))
    check_onnx(dst)
    fused = {op: count for op, count in sorted(stats.items()) if count}
    if attention:
        fused["Attention (ONNX, replacing MultiHeadAttention)"] = attention
        fused.pop("MultiHeadAttention", None)
    record = {"tool": FUSION_TOOL, "model_type": "bert", "opt_level": 0, "source_model_type": model_type,
              "fusions_enabled": ["MultiHeadAttention", "LayerNormalization", "Gelu"], "fused": fused,
              "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)}
    if failure:
        record["opset_conversion"] = f"kept the source opset ({failure})"
    return record


def describe_source_quantization(path: Path) -> dict[str, Any]:
    """What can be read back from an already-quantized graph: scheme, weight type and per-channel scales."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {init.name: init for init in model.graph.initializer}
    ops = {node.op_type for node in model.graph.node}
    weight_types, per_channel = set(), set()
    for node in model.graph.node:
        positions = {"MatMulInteger": (1, 3), "MatMulIntegerToFloat": (1, 3)}.get(node.op_type)
        if positions is None:
            continue
        weight_at, scale_at = positions
        if len(node.input) <= weight_at or node.input[weight_at] not in inits:
            continue
        weight = inits[node.input[weight_at]]
        weight_types.add("int8" if weight.data_type == onnx.TensorProto.INT8 else "uint8")
        columns = weight.dims[-1] if weight.dims else 1
        if len(node.input) > scale_at and node.input[scale_at] in inits and columns > 1:  # one column tells nothing
            per_channel.add(int(np.prod(inits[node.input[scale_at]].dims)) > 1)
    static = "DynamicQuantizeLinear" not in ops and "QuantizeLinear" in ops
    return {"mode": "static-int8" if static else "dynamic-int8", "applied_by": "source", "target": None,
            "per_channel": per_channel.pop() if len(per_channel) == 1 else None, "reduce_range": None,
            "weight_type": weight_types.pop() if len(weight_types) == 1 else None, "activation_type": "uint8"}
