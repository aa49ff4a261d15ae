"""Writes PyTorch-style checkpoints (names, [out, in] / [out, in, 3, 3] layouts, CHW
inputs) in f32, f16 and bf16 with numpy only, plus reference inputs and the logits a
numpy forward pass with PyTorch's semantics gives, and some broken checkpoints.

usage: write_checkpoints.py OUT_DIR
"""
import json
import struct
import sys
from pathlib import Path

import numpy as np

rng = np.random.default_rng(0)


def bf16_bits(x):
    u = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def from_bf16(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


def save(path, tensors):
    """A minimal safetensors writer (numpy has no bfloat16): name -> (array, dtype)."""
    header, blobs, offset = {}, [], 0
    for name, (array, dtype) in tensors.items():
        if dtype == "BF16":
            data = bf16_bits(array).tobytes()
        else:
            data = np.ascontiguousarray(array, dtype={"F32": "<f4", "F16": "<f2"}[dtype]).tobytes()
        header[name] = {"dtype": dtype, "shape": list(np.shape(array)), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def stored(array, dtype):
    """The values the file holds, as float64."""
    if dtype == "BF16":
        return from_bf16(bf16_bits(array)).astype(np.float64)
    return np.asarray(array, dtype={"F32": np.float32, "F16": np.float16}[dtype]).astype(np.float64)


def linear(fan_in, fan_out):
    return rng.normal(0, 1 / np.sqrt(fan_in), (fan_out, fan_in)), rng.normal(0, 0.1, fan_out)


def mlp_forward(layers, x):
    for i, (w, b) in enumerate(layers):
        x = x @ w.T + b
        if i + 1 < len(layers):
            x = np.maximum(x, 0)
    return x


def conv_forward(w, b, x):
    n, c, h, wd = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((n, w.shape[0], h, wd)) + b[None, :, None, None]
    for ky in range(3):
        for kx in range(3):
            out += np.einsum("oc,nchw->nohw", w[:, :, ky, kx], xp[:, :, ky:ky + h, kx:kx + wd])
    return out


def pool2(x):
    n, c, h, w = x.shape
    x = x[:, :, : h // 2 * 2, : w // 2 * 2]
    return x.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))


def write_model(out, name, tensors, dtype, forward, input_shape, samples=5):
    """Saves the checkpoint and a reference file of inputs [N, C, H, W] and logits."""
    save(out / f"{name}.safetensors", {k: (v, dtype) for k, v in tensors.items()})
    values = {k: stored(v, dtype) for k, v in tensors.items()}
    x = rng.uniform(0, 1, (samples, *input_shape))
    logits = forward(values, x)
    save(out / f"{name}_ref.safetensors", {"inputs": (x, "F32"), "logits": (logits, "F32")})


def main():
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)

    # The upstream's MLP (layers.linear_i) under a Lightning `model.` prefix, f16, on
    # the tests' 12x10 MNIST stand-in.
    dims = [120, 16, 12, 10]
    mlp = {}
    for i, (a, b) in enumerate(zip(dims, dims[1:])):
        w, bias = linear(a, b)
        mlp[f"model.layers.linear_{i}.weight"], mlp[f"model.layers.linear_{i}.bias"] = w, bias
    def mlp_fwd(v, x, prefix="model.layers.linear_", n=3):
        layers = [(v[f"{prefix}{i}.weight"], v[f"{prefix}{i}.bias"]) for i in range(n)]
        return mlp_forward(layers, x.reshape(len(x), -1))
    write_model(out, "mlp_f16", mlp, "F16", mlp_fwd, (1, 12, 10))

    # nn.Sequential(Linear, ReLU, Linear, ReLU, Linear) on 32x32x3 (CIFAR): CHW flattening.
    seq, dims = {}, [3072, 8, 6, 10]
    for i, (a, b) in enumerate(zip(dims, dims[1:])):
        seq[f"{2 * i}.weight"], seq[f"{2 * i}.bias"] = linear(a, b)
    def seq_fwd(v, x):
        layers = [(v[f"{2 * i}.weight"], v[f"{2 * i}.bias"]) for i in range(3)]
        return mlp_forward(layers, x.reshape(len(x), -1))
    write_model(out, "seq_f32", seq, "F32", seq_fwd, (3, 32, 32))

    # The upstream's CNN (conv_layers.conv_i, mlp.layers.linear_i), bf16, on CIFAR.
    cnn = {}
    for i, (cin, cout) in enumerate([(3, 4), (4, 6)]):
        cnn[f"conv_layers.conv_{i}.weight"] = rng.normal(0, 1 / np.sqrt(9 * cin), (cout, cin, 3, 3))
        cnn[f"conv_layers.conv_{i}.bias"] = rng.normal(0, 0.1, cout)
    for i, (a, b) in enumerate([(6, 8), (8, 10)]):
        cnn[f"mlp.layers.linear_{i}.weight"], cnn[f"mlp.layers.linear_{i}.bias"] = linear(a, b)
    def cnn_fwd(v, x):
        for i in range(2):
            x = pool2(np.maximum(conv_forward(v[f"conv_layers.conv_{i}.weight"], v[f"conv_layers.conv_{i}.bias"], x), 0))
        return mlp_fwd(v, x.max(axis=(2, 3)), "mlp.layers.linear_", 2)
    write_model(out, "cnn_bf16", cnn, "BF16", cnn_fwd, (3, 32, 32))

    # Broken ones.
    no_bias = dict(mlp)
    del no_bias["model.layers.linear_1.bias"]
    save(out / "no_bias.safetensors", {k: (v, "F32") for k, v in no_bias.items()})
    bn = dict(mlp)
    bn["model.bn.running_mean"] = np.zeros(16)
    save(out / "batchnorm.safetensors", {k: (v, "F32") for k, v in bn.items()})
    chain = dict(mlp)
    chain["model.layers.linear_1.weight"] = rng.normal(0, 1, (12, 15))
    save(out / "bad_chain.safetensors", {k: (v, "F32") for k, v in chain.items()})
    nan = dict(mlp)
    nan["model.layers.linear_2.weight"] = mlp["model.layers.linear_2.weight"].copy()
    nan["model.layers.linear_2.weight"][3, 4] = np.nan
    save(out / "nan.safetensors", {k: (v, "F16") for k, v in nan.items()})


main()
