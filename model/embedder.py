"""The bi-encoder: texts -> vectors, pooled and normalized as its manifest records."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from twostage.model.manifest import ManifestError
from twostage.model.onnx_model import OnnxModel
from twostage.model.postprocess import embeddings_from_hidden
from twostage.model.tokenization import Encoded, encode_texts


class Embedder(OnnxModel):
    """Texts -> pooled (and optionally L2-normalized) embeddings [n, dimension]: `encode` tokenizes, `run_batch`
    runs a batch of encoded texts (the server's batcher calls it), `embed` does both for a list of texts."""

    role = "bi-encoder"

    @property
    def pooling(self) -> str | None:
        return self.spec.pooling

    @property
    def normalize(self) -> bool:
        return self.spec.normalize

    def encode(self, texts: Sequence[str], *, max_tokens: int = 0, truncate: bool = True,
               field: str = "texts") -> list[Encoded]:
        """Texts with special tokens, each at most `max_tokens` (0 = the model's max_length, and never more)."""
        limit = self.max_length if not max_tokens else min(max_tokens, self.max_length)
        return encode_texts(self.tokenizer, texts, limit, truncate=truncate, field=field)

    def embed(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Vectors of `texts` (truncated to max_length), run `batch_size` texts at a time in the given order."""
        return self.run_batches(self.encode(texts), batch_size)

    def postprocess(self, output: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        if output.ndim == 2:  # the graph already pools
            return embeddings_from_hidden(output[:, None, :], np.ones((len(output), 1)), "cls", self.normalize)
        if self.pooling is None:
            raise ManifestError(f"{self.described_by}: token-level output {self.spec.output!r} needs a pooling mode")
        return embeddings_from_hidden(output, attention_mask, self.pooling, self.normalize)

    def warm_up_batch(self) -> list[Encoded]:
        return self.encode(["warm up run", "a second, somewhat longer warm up text"])
