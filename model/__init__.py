"""twostage model layer: everything that turns text into vectors and scores, shared by the server, `twostage index
build`, the export's accuracy gate and the benchmarks, so that each of them runs a model exactly the same way.

    manifest       the model directory contract: reading manifest.json and verifying every file's sha256
    tokenization   text -> token ids (special-token layout, truncation policy, long-document chunks)
    session        ONNX Runtime sessions: providers, thread layout, session options, the rewrites left out
    postprocess    model outputs -> embeddings (pooling, normalization) and scores (raw, sigmoid/softmax)
    onnx_model     a session + tokenizer for one model file: padded batches in, post-processed rows out
    embedder       `Embedder`: texts -> vectors with the recorded pooling and normalization
    reranker       `Reranker`: (query, document) pairs -> raw and normalized scores, best chunk per document
    model_set      opening DIR/bi-encoder and DIR/cross-encoder as `twostage export --out DIR` writes them
    errors         TwoStageError and InvalidArgument (tokenization refuses over-long input naming the field)

Importing this package is cheap (no onnxruntime, no numpy): the export step's manifest writer imports
`twostage.model.manifest`, which is standard library only.
"""
