"""Independent check of model.safetensors: numpy forward pass vs cupbearer's logits.

usage: check_forward.py MODEL.safetensors REFERENCE.safetensors
REFERENCE holds `inputs` (f32 [n, H*W*C], HWC-flattened, in [0, 1]) and `logits`.
A CNN (config `conv_channels`) has Conv_{i}.kernel [3, 3, in, out] (HWIO) and
Conv_{i}.bias: 3x3 SAME convolution, ReLU, 2x2 max pool (VALID), then a global max
pool before the dense layers, as in the original's Flax model.
"""
import json
import sys

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file

model_path, ref_path = sys.argv[1], sys.argv[2]
with safe_open(model_path, framework="numpy") as f:
    config = json.loads(f.metadata()["cupbearer.model"])
params = load_file(model_path)
ref = load_file(ref_path)


def f64(name):
    t = params[name]
    assert t.dtype == np.float32, name
    return t.astype(np.float64)


x = ref["inputs"].astype(np.float64)
n = len(x)
height, width, channels = config["input_shape"]
h = x.reshape(n, height, width, channels)
for i, _ in enumerate(config.get("conv_channels", [])):
    kernel, bias = f64(f"Conv_{i}.kernel"), f64(f"Conv_{i}.bias")
    padded = np.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)))
    hh, ww = h.shape[1], h.shape[2]
    out = np.zeros((n, hh, ww, kernel.shape[3])) + bias
    for ky in range(3):
        for kx in range(3):
            out += padded[:, ky:ky + hh, kx:kx + ww, :] @ kernel[ky, kx]
    out = np.maximum(out, 0.0)
    ho, wo = hh // 2, ww // 2
    h = out[:, :2 * ho, :2 * wo, :].reshape(n, ho, 2, wo, 2, -1).max(axis=(2, 4))
if config.get("conv_channels"):
    h = h.max(axis=(1, 2))
else:
    h = h.reshape(n, -1)

n_layers = len(config["hidden_dims"]) + 1
for i in range(n_layers):
    h = h @ f64(f"Dense_{i}.kernel") + f64(f"Dense_{i}.bias")
    if i + 1 < n_layers:
        h = np.maximum(h, 0.0)

err = np.abs(h - ref["logits"]).max()
print(f"{n} samples, max |numpy - cupbearer| = {err:.3e}")
sys.exit(0 if err <= 1e-4 else 1)
