"""twostage export: Hugging Face checkpoint or ONNX in, model directory with manifest.json out.

Importing this package must stay cheap and torch-free: the server imports `twostage.export.manifest`.
"""
