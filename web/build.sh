#!/usr/bin/env bash
# Builds the browser page into web/dist/: the wasm module (release build for
# wasm32-unknown-unknown, bound by wasm-bindgen) beside index.html and app.js, plus
# MNIST's four .gz files when MNIST_DIR (default ../shared/data/mnist) has them.
# Serve it with any static server: python3 -m http.server -d web/dist 8000
set -euo pipefail
cd "$(dirname "$0")/.."
want=$(sed -n 's/^wasm-bindgen = "=\(.*\)"/\1/p' web/Cargo.toml)
if ! wasm-bindgen --version 2>/dev/null | grep -q "$want"; then
  echo "web/build.sh: needs wasm-bindgen-cli $want: cargo install wasm-bindgen-cli --version $want" >&2
  exit 1
fi
cargo build --locked -p cupbearer-web --release --target wasm32-unknown-unknown
out=web/dist.tmp
rm -rf "$out" && mkdir -p "$out"
wasm-bindgen --target web --no-typescript --out-dir "$out/pkg" \
  target/wasm32-unknown-unknown/release/cupbearer_web.wasm
cp web/index.html web/app.js "$out/"
mnist=${MNIST_DIR:-../shared/data/mnist}
for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
  if [ -f "$mnist/$f.gz" ]; then cp "$mnist/$f.gz" "$out/"; fi
done
rm -rf web/dist && mv "$out" web/dist
echo "built web/dist ($(du -sh web/dist/pkg | cut -f1) of wasm and glue)"
