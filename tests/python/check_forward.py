"""Independent check of model.safetensors: numpy forward pass vs cupbearer's logits.

usage: check_forward.py MODEL.safetensors REFERENCE.safetensors
REFERENCE holds `inputs` (f32 [n, 784-ish], HWC-flattened, in [0, 1]) and `logits`.
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

n_layers = len(config["hidden_dims"]) + 1
h = ref["inputs"].astype(np.float64)
for i in range(n_layers):
    kernel, bias = params[f"Dense_{i}.kernel"], params[f"Dense_{i}.bias"]
    assert kernel.dtype == np.float32 and bias.dtype == np.float32
    h = h @ kernel.astype(np.float64) + bias.astype(np.float64)
    if i + 1 < n_layers:
        h = np.maximum(h, 0.0)

err = np.abs(h - ref["logits"]).max()
print(f"{len(h)} samples, max |numpy - cupbearer| = {err:.3e}")
sys.exit(0 if err <= 1e-4 else 1)
