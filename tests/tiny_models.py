"""Tiny random BERT checkpoints (hidden size 32, 2 layers) and a tiny exported model set, for tests that
need real models but not real accuracy. Building one takes about a second; exporting a set a few seconds.

    make_tiny_bert_checkpoint(dir, task="embedding" | "rerank", num_labels=1) -> Path
    make_tiny_model_set(out_dir) -> Path   # out_dir/bi-encoder/ and out_dir/cross-encoder/, as `twostage export` writes
"""
from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Whole words first; every other lowercase word falls back to single-character word pieces, so any text
# tokenizes to varied ids instead of [UNK].
COMMON_WORDS = """
the a an and or of to in on at for with from by is are was were be been it this that these those what how
why when where which who can do does did not no yes my your our their his her its we you they i he she
time day year week night water light energy heat cold food bread coffee tea milk sugar salt oil bike car
train road city house room door window book page word language music song guitar piano game chess team
ball run walk sleep dog cat bird bee fish tree plant leaf flower seed soil rain sun moon star sea river
mountain volcano earth stone rock glass paper plastic metal money bank tax rent job work school student
teacher doctor health pain burn ankle vaccine virus computer code data server query index search model
password network file error page list python git branch commit phone battery camera photo lens color
""".split()


def tiny_vocab() -> list[str]:
    chars = list(string.ascii_lowercase + string.digits)
    punctuation = list(".,;:!?'\"()-/[]{}%$&*+=<>@#_")
    words = [w for w in dict.fromkeys(COMMON_WORDS) if w not in chars]
    return SPECIAL_TOKENS + chars + punctuation + ["##" + c for c in chars] + words


def write_tiny_tokenizer(directory: Path, model_max_length: int = 512, fast: bool = True) -> None:
    """vocab.txt, tokenizer_config.json, special_tokens_map.json and (fast=True) tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    directory = Path(directory)
    vocab = tiny_vocab()
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    ids = {token: i for i, token in enumerate(vocab)}
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": model_max_length,
              "pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
              "mask_token": "[MASK]"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
               "mask_token": "[MASK]"}
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    if not fast:
        return
    tokenizer = Tokenizer(models.WordPiece(vocab=ids, unk_token="[UNK]", max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])])
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.save(str(directory / "tokenizer.json"))


def write_sentence_transformers_config(directory: Path, pooling: str = "mean", normalize: bool = True,
                                       max_seq_length: int = 64, dimension: int = 32) -> None:
    """modules.json, 1_Pooling/config.json and sentence_bert_config.json as sentence-transformers writes them."""
    directory = Path(directory)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (directory / "modules.json").write_text(json.dumps(modules, indent=2))
    (directory / "1_Pooling").mkdir(exist_ok=True)
    pooling_config = {"word_embedding_dimension": dimension, "pooling_mode_cls_token": pooling == "cls",
                      "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": pooling == "max",
                      "pooling_mode_mean_sqrt_len_tokens": False}
    (directory / "1_Pooling" / "config.json").write_text(json.dumps(pooling_config, indent=2))
    (directory / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length,
                                                                     "do_lower_case": False}))


def make_tiny_bert_checkpoint(directory: Path, task: str = "embedding", num_labels: int = 1, *,
                              pooling: str = "mean", normalize: bool = True, labels: list[str] | None = None,
                              seed: int = 0, fast_tokenizer: bool = True) -> Path:
    """Write a random BERT checkpoint (safetensors + config + tokenizer) into `directory` and return it.

    task "embedding": BertModel plus sentence-transformers files (pooling / normalize as given).
    task "rerank": BertForSequenceClassification with `num_labels` logits (names from `labels`)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    if task not in ("embedding", "rerank"):
        raise ValueError(f"task {task!r} not one of ('embedding', 'rerank')")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    extra = {}
    if task == "rerank":
        names = labels or [f"LABEL_{i}" for i in range(num_labels)]
        extra = {"num_labels": num_labels, "id2label": dict(enumerate(names)),
                 "label2id": {n: i for i, n in enumerate(names)}}
    # initializer_range 0.2 (not BERT's 0.02) so that a random model's outputs differ clearly between
    # texts: the accuracy gate ranks them, and near-identical outputs would make rankings arbitrary.
    config = BertConfig(vocab_size=len(tiny_vocab()), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=128, initializer_range=0.2, **extra)
    torch.manual_seed(seed)
    model = BertModel(config) if task == "embedding" else BertForSequenceClassification(config)
    model.eval()
    model.save_pretrained(str(directory), safe_serialization=True)
    write_tiny_tokenizer(directory, fast=fast_tokenizer)
    if task == "embedding":
        write_sentence_transformers_config(directory, pooling, normalize, dimension=config.hidden_size)
    return directory


def make_tiny_model_set(out_dir: Path) -> Path:
    """Export a tiny bi-encoder and a tiny cross-encoder with `twostage export`'s pipeline into out_dir
    (out_dir/bi-encoder/, out_dir/cross-encoder/, each with a verified manifest.json). Returns out_dir."""
    import io

    from twostage.export.pipeline import ExportOptions, export_model_set
    from twostage.export.sources import resolve_source

    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="tiny-sources-") as tmp:
        bi = make_tiny_bert_checkpoint(Path(tmp) / "tiny-bi-encoder", "embedding")
        cross = make_tiny_bert_checkpoint(Path(tmp) / "tiny-cross-encoder", "rerank", num_labels=1, seed=1)
        sources = [resolve_source(str(bi), "bi-encoder"), resolve_source(str(cross), "cross-encoder")]
        # Default thresholds; should int8 kernels of some CPU move a random model's figures below them, the
        # set is still produced (serving fp32) so that server tests do not depend on the gate's margins.
        export_model_set(out_dir, sources, ExportOptions(keep_fp32_on_gate_failure=True), stream=io.StringIO())
    return out_dir
