"""twostage export: Hugging Face checkpoint or ONNX in, model directory with manifest.json out.

Importing this package must stay cheap and torch-free (`twostage export --help`, up-to-date checks). The
manifest's reader and the runtime the gate measures with are the model layer's (twostage.model).
"""
