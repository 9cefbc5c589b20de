"""Export side (imports torch): denoiser architectures, training on phantoms, ONNX export and checks."""
