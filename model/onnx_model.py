"""One model file with its session and tokenizer: padded batches of `Encoded` rows in, post-processed rows out.
Use the role classes, `Embedder` (embedder.py) and `Reranker` (reranker.py).

`run_batch` pads a batch to its longest member (pad id from the tokenizer, attention mask 1 on real tokens),
feeds only the inputs the graph declares, in the integer type it declares, and returns float32 rows. It is the
entry point of the server's batcher, which batches already-tokenized items; ONNX Runtime releases the GIL while
it runs, so calling it from a worker thread keeps the event loop serving.

A model is described by a `ModelSpec`: from a verified model directory (`OnnxModel.open`, what the server, `index
build` and bench/ load) or from the export's own facts (the accuracy gate runs its candidates before their
manifest exists), so that both run the graph exactly the same way.
"""
from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from twostage.model.manifest import ManifestError, ModelDir, sha256_file, verify_model_dir
from twostage.model.session import SessionSettings, open_session
from twostage.model.tokenization import Encoded, ModelTokenizer, padded_tokens

KNOWN_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
ONNX_INT_TYPES: dict[str, type[np.integer]] = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}

M = TypeVar("M", bound="OnnxModel")


@dataclass(frozen=True)
class ModelSpec:
    """What running one model file needs to know."""

    model_path: Path
    tokenizer_path: Path
    output: str                    # the graph output that is read
    max_length: int                # tokens per input (per pair for a cross-encoder), specials included
    dimension: int | None = None   # row width; checked against the warm-up output when given
    pooling: str | None = None     # bi-encoder: "mean" | "cls" | "max"
    normalize: bool = False        # bi-encoder: L2-normalize the pooled vector
    positive_label: int = 0        # cross-encoder: the logit that is the score

    @classmethod
    def from_model_dir(cls, model_dir: ModelDir) -> ModelSpec:
        m = model_dir.manifest
        return cls(model_path=model_dir.model_path, tokenizer_path=model_dir.tokenizer_path, output=m["output"],
                   max_length=int(m["max_length"]), dimension=int(m["dimension"]), pooling=m.get("pooling"),
                   normalize=bool(m.get("normalize", False)), positive_label=int(m.get("positive_label") or 0))


def pad_batch(batch: Sequence[Encoded], pad_id: int) -> dict[str, np.ndarray]:
    """Right-pad a batch to its longest member: input_ids, attention_mask, token_type_ids (int64)."""
    if not batch:
        raise ValueError("empty batch")
    longest = max(len(e) for e in batch)
    ids = np.full((len(batch), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(batch), longest), dtype=np.int64)
    types = np.zeros((len(batch), longest), dtype=np.int64)
    for row, enc in enumerate(batch):
        n = len(enc)
        ids[row, :n] = enc.ids
        mask[row, :n] = 1
        types[row, :n] = enc.type_ids
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def model_feeds(padded: dict[str, np.ndarray], input_types: Mapping[str, type[np.integer]]) -> dict[str, np.ndarray]:
    """The feeds a graph declares (`input_types`: name -> integer type) from a padded batch; position_ids, when
    declared, count 0.. along each row (right padding keeps real tokens at the start)."""
    feeds = {}
    for name, dtype in input_types.items():
        if name == "position_ids":
            ids = padded["input_ids"]
            value = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape)
        else:
            value = padded[name]
        feeds[name] = value.astype(dtype, copy=False)
    return feeds


class OnnxModel:
    """A model file's session and tokenizer. Subclasses set `role` and implement `postprocess` and
    `warm_up_batch`."""

    role = ""

    def __init__(self, spec: ModelSpec, settings: SessionSettings = SessionSettings(),
                 manifest: dict[str, Any] | None = None):
        self.spec = spec
        self.manifest: dict[str, Any] = manifest or {}
        self.tokenizer = ModelTokenizer.from_file(spec.tokenizer_path)
        self.session = open_session(spec.model_path, settings)
        declared = {i.name: ONNX_INT_TYPES.get(i.type) for i in self.session.get_inputs()}
        unsupported = [name for name, dtype in declared.items() if name not in KNOWN_INPUTS or dtype is None]
        if unsupported:
            raise ManifestError(f"{spec.model_path}: graph inputs {unsupported} are not int32/int64 "
                                f"inputs among {KNOWN_INPUTS}")
        self.input_types: dict[str, type[np.integer]] = {k: v for k, v in declared.items() if v is not None}
        outputs = [o.name for o in self.session.get_outputs()]
        if spec.output not in outputs:
            raise ManifestError(f"{self.described_by}: output {spec.output!r} not among the graph outputs {outputs}")
        self._counting = threading.Lock()  # run_batch is called from several worker threads
        self.batches_run = 0
        self.real_tokens_run = 0
        self.padded_tokens_run = 0
        self.warm_up()

    @classmethod
    def open(cls: type[M], directory: str | Path, settings: SessionSettings = SessionSettings()) -> M:
        """Load a model directory made by `twostage export`, verified against its manifest (role and sha256)."""
        model_dir = verify_model_dir(Path(directory), cls.role)
        return cls(ModelSpec.from_model_dir(model_dir), settings, manifest=model_dir.manifest)

    # ---------------------------------------------------------------- facts
    @property
    def name(self) -> str:
        return str(self.manifest.get("name") or self.spec.model_path.name)

    @property
    def max_length(self) -> int:
        return self.spec.max_length

    @property
    def dimension(self) -> int:
        """Row width: the manifest's, else what the warm-up produced."""
        return self.spec.dimension if self.spec.dimension is not None else self._warm_up_width

    @property
    def described_by(self) -> Path:
        """The file that states the model's facts, for error messages: its manifest, else the model file."""
        return self.spec.model_path.parent / "manifest.json" if self.manifest else self.spec.model_path

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    @property
    def sha256(self) -> str:
        """sha256 of the model file (from the manifest when there is one)."""
        files = self.manifest.get("files") or {}
        return files.get(self.manifest.get("model_file")) or sha256_file(self.spec.model_path)

    # ---------------------------------------------------------------- inference
    def run_batch(self, batch: Sequence[Encoded]) -> np.ndarray:
        """Post-processed output rows for the batch, in batch order (float32)."""
        padded = pad_batch(batch, self.tokenizer.pad_id)
        (output,) = self.session.run([self.spec.output], model_feeds(padded, self.input_types))
        with self._counting:
            self.batches_run += 1
            self.real_tokens_run += sum(len(e) for e in batch)
            self.padded_tokens_run += padded_tokens(batch)
        return self.postprocess(np.asarray(output), padded["attention_mask"])

    def run_batches(self, items: Sequence[Encoded], batch_size: int) -> np.ndarray:
        """`run_batch` over consecutive slices of `batch_size` items, rows concatenated in item order."""
        if not items:
            raise ValueError("no items to run")
        return np.concatenate([self.run_batch(items[i:i + batch_size]) for i in range(0, len(items), batch_size)])

    def postprocess(self, output: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def warm_up(self) -> None:
        """Run one small batch so the first request does not pay for lazy initialization; check output width."""
        rows = self.run_batch(self.warm_up_batch())
        if rows.ndim != 2 or (self.spec.dimension is not None and rows.shape[1] != self.spec.dimension):
            raise ManifestError(f"{self.described_by}: dimension is {self.spec.dimension} but the model produced "
                                f"rows of shape {rows.shape[1:]}")
        self._warm_up_width = int(rows.shape[1])
        self.batches_run = self.real_tokens_run = self.padded_tokens_run = 0

    def warm_up_batch(self) -> list[Encoded]:
        raise NotImplementedError
