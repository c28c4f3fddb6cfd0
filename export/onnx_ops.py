"""The ONNX steps of an export: checkpoint -> ONNX (optimum), inspection and validation, graph
optimization, dynamic int8 quantization. Heavy imports (torch, optimum, onnx) happen inside functions.

Choices, measured on all-MiniLM-L6-v2 with ONNX Runtime 1.32 on an AVX-512 VNNI CPU (batch 32, 1 thread):

- model_fp32.onnx is the transformer-fused graph (onnxruntime.transformers optimizer, model_type "bert":
  Attention, EmbedLayerNormalization, SkipLayerNormalization, BiasGelu); it matches the raw export to
  cosine 0.9999999.
- The int8 model is quantized from the *unfused* graph after ORT's own pre-quantization pass
  (quant_pre_process: symbolic shape inference + ORT basic optimization). Quantizing the fused graph
  (QAttention) ran about 25 % slower at batch 32 than quantizing the unfused graph, which ONNX Runtime
  fuses itself at load time (MatMulIntegerToFloat etc.), with the same accuracy.
- An already-int8 graph only gets ORT's basic-level offline optimization (constant folding, redundant
  node removal). The transformer optimizer's Python fusions applied to the packaged int8 reranker
  changed its logits by up to 0.43, with no speed gain.
- Weights are quantized per channel: per-tensor int8 kept only 0.967 mean cosine to fp32 on
  all-MiniLM-L6-v2, per-channel 0.993.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .cpu import QuantTarget
from .errors import ExportError

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
REQUIRED_INPUTS = ("input_ids", "attention_mask")
# Node types that only appear in an already-quantized graph.
QUANTIZED_OPS = {
    "MatMulInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "ConvInteger",
    "QAttention", "QEmbedLayerNormalization", "QGemm", "QuantizeLinear", "DequantizeLinear",
}
# Operators quantized dynamically: weight matrices only. (Quantizing the embedding Gather too shrinks the
# file by 60 % but lowers all-MiniLM-L6-v2's cosine to fp32 a little; size is not the bottleneck here.)
QUANTIZE_OP_TYPES = ("MatMul", "Attention")


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


def fuse_transformer(src: Path, dst: Path, model_type: str | None) -> dict[str, Any]:
    """Transformer fusions of onnxruntime.transformers (Python patterns only: opt_level 0, so the graph
    stays free of ORT's hardware-specific rewrites). Returns a record of what was fused."""
    from onnxruntime.transformers.optimizer import optimize_model

    # The BERT patterns also match RoBERTa-style encoders; patterns that do not match leave the graph as is,
    # and the accuracy gate checks the result either way.
    family = "bert"
    with quiet_libraries():
        try:
            optimized = optimize_model(str(src), model_type=family, opt_level=0, use_gpu=False)
        except Exception as exc:
            raise ExportError(f"{src}: transformer graph optimization failed: {exc}") from exc
        optimized.save_model_to_file(str(dst))
        stats = optimized.get_fused_operator_statistics()
    fused = {op: count for op, count in sorted(stats.items()) if count}
    return {"tool": "onnxruntime.transformers.optimizer", "model_type": family, "opt_level": 0,
            "source_model_type": model_type, "fused": fused}


def ort_basic_optimize(src: Path, dst: Path) -> dict[str, Any]:
    """ONNX Runtime's basic-level graph optimization saved offline (portable: standard ONNX ops only)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(dst)
    with quiet_libraries():
        try:
            ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ExportError(f"{src}: ONNX Runtime cannot load the model: {exc}") from exc
    if not dst.is_file():
        raise ExportError(f"{src}: ONNX Runtime did not write the optimized model {dst}")
    return {"tool": "onnxruntime", "level": "basic", "offline": True}


def prepare_for_quantization(src: Path, dst: Path) -> str:
    """ORT's recommended pre-quantization pass (shape inference + ORT basic optimization). Symbolic shape
    inference does not complete on every exported graph (e.g. opset-18 BERT from torch 2.13); then the pass
    runs with ONNX shape inference only, and failing that the graph is quantized as exported."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    attempts = (({}, "symbolic + ONNX shape inference, ORT basic optimization"),
                ({"skip_symbolic_shape": True}, "ONNX shape inference, ORT basic optimization"))
    with quiet_libraries():
        for kwargs, description in attempts:
            try:
                quant_pre_process(str(src), str(dst), **kwargs)
                return f"onnxruntime quant_pre_process ({description})"
            except Exception:
                continue
    shutil.copyfile(src, dst)
    return "none (quant_pre_process failed on this graph; quantized as exported)"


def quantize_int8(src: Path, dst: Path, target: QuantTarget) -> dict[str, Any]:
    """Dynamic int8 quantization with per-channel weights; returns the manifest's quantization record."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    weight_type = QuantType.QInt8 if target.weight_type == "int8" else QuantType.QUInt8
    with quiet_libraries():
        try:
            quantize_dynamic(str(src), str(dst), weight_type=weight_type, per_channel=True,
                             reduce_range=target.reduce_range, op_types_to_quantize=list(QUANTIZE_OP_TYPES),
                             extra_options={"MatMulConstBOnly": True,
                                            "DefaultTensorType": onnx.TensorProto.FLOAT})
        except Exception as exc:
            raise ExportError(f"{src}: dynamic int8 quantization failed: {exc}") from exc
    return {"mode": "dynamic-int8", "applied_by": "twostage export", "target": target.name, "per_channel": True,
            "reduce_range": target.reduce_range, "weight_type": target.weight_type, "activation_type": "uint8",
            "op_types": list(QUANTIZE_OP_TYPES)}


def describe_source_quantization(path: Path) -> dict[str, Any]:
    """What can be read back from an already-quantized graph: weight type and per-channel scales."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {init.name: init for init in model.graph.initializer}
    weight_types, per_channel = set(), set()
    for node in model.graph.node:
        if node.op_type == "MatMulInteger" and len(node.input) > 1 and node.input[1] in inits:
            weight_types.add("int8" if inits[node.input[1]].data_type == onnx.TensorProto.INT8 else "uint8")
            columns = inits[node.input[1]].dims[-1] if inits[node.input[1]].dims else 1
            if len(node.input) > 3 and node.input[3] in inits and columns > 1:  # one column tells nothing
                per_channel.add(int(np.prod(inits[node.input[3]].dims)) > 1)
    return {"mode": "dynamic-int8", "applied_by": "source", "target": None,
            "per_channel": per_channel.pop() if len(per_channel) == 1 else None, "reduce_range": None,
            "weight_type": weight_types.pop() if len(weight_types) == 1 else None, "activation_type": "uint8"}


def inference_session(path: Path, threads: int | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ExportError(f"{path}: ONNX Runtime cannot load the model: {exc}") from exc
