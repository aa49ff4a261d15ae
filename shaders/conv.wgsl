// Convolution and pooling helpers of the CNN, on HWC batches [batch][height][width][channels].
// A 3x3 SAME convolution is im2col + the matmul kernel (bias and ReLU in its epilogue);
// its input gradient is the matmul back to columns + col2im (a gather, so no atomics).
//   im2col:          cols[(b,y,x)][(ky·3+kx)·C + c] = in[b][y+ky-1][x+kx-1][c], 0 outside.
//   col2im:          dx[b][y][x][c] = Σ_{ky,kx} dcols[(b, y-ky+1, x-kx+1)][(ky·3+kx)·C + c].
//   max_pool:        2x2, stride 2, VALID (floor); keeps the argmax (0..3) per output.
//   max_pool_grad:   routes each output gradient to its argmax, times ReLU'(conv output).
//   global_max:      max over height and width per channel; keeps the argmax position.
//   global_max_grad: routes each gradient to its argmax position.
// params describe the convolution input (im2col, col2im) or the pooling input.

struct ConvParams {
    batch: u32,
    height: u32,
    width: u32,
    channels: u32,
}

@group(0) @binding(0) var<storage, read> src: array<f32>;
@group(0) @binding(1) var<storage, read_write> dst: array<f32>;
@group(0) @binding(2) var<storage, read_write> argmax: array<u32>;
@group(0) @binding(3) var<storage, read> mask: array<f32>;
@group(0) @binding(4) var<uniform> params: ConvParams;
// A transposed copy of the output, [columns][batch·H·W]: im2col's columns (the forward
// matmul reads its A operand fastest K-major; dW reads the row-major copy) and
// max_pool_grad's conv gradient (for the columns' gradient, which it multiplies).
@group(0) @binding(5) var<storage, read_write> dst_t: array<f32>;

override WRITE_ROWS: bool = true;
override WRITE_T: bool = false;

fn pixel_index(b: u32, y: u32, x: u32, c: u32) -> u32 {
    return ((b * params.height + y) * params.width + x) * params.channels + c;
}

// One invocation per spatial position, looping over taps and channels: integer
// division by a runtime value is scalarised on CPU adapters, so it is done once per
// position rather than once per element (MNIST CNN, batch 128: im2col of conv 2
// 76 -> 22 ms, max-pool backward 36 + 49 -> 12 + 22 ms).

struct Position {
    b: u32,
    y: u32,
    x: u32,
}

fn position(i: u32, height: u32, width: u32) -> Position {
    let x = i % width;
    let t = i / width;
    return Position(t / height, t % height, x);
}

@compute @workgroup_size(64, 1, 1)
fn im2col(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let c_in = params.channels;
    let total = params.batch * params.height * params.width;
    for (var row = gid.x; row < total; row += nwg.x * 64u) {
        let p = position(row, params.height, params.width);
        var col = 0u;
        for (var k = 0u; k < 9u; k++) {
            // Unsigned wrap-around makes out-of-range coordinates large.
            let sy = p.y + k / 3u - 1u;
            let sx = p.x + k % 3u - 1u;
            let inside = sy < params.height && sx < params.width;
            let base = select(0u, pixel_index(p.b, sy, sx, 0u), inside);
            for (var c = 0u; c < c_in; c++) {
                let v = select(0.0, src[base + c], inside);
                if (WRITE_ROWS) {
                    dst[row * 9u * c_in + col] = v;
                }
                if (WRITE_T) {
                    dst_t[col * total + row] = v;
                }
                col++;
            }
        }
    }
}

@compute @workgroup_size(64, 1, 1)
fn col2im(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let c_in = params.channels;
    let total = params.batch * params.height * params.width;
    for (var i = gid.x; i < total; i += nwg.x * 64u) {
        let p = position(i, params.height, params.width);
        let to = i * c_in;
        for (var c = 0u; c < c_in; c++) {
            dst[to + c] = 0.0;
        }
        for (var k = 0u; k < 9u; k++) {
            // The output position whose window puts this pixel at tap k.
            let py = p.y + 1u - k / 3u;
            let px = p.x + 1u - k % 3u;
            if (py < params.height && px < params.width) {
                let row = (p.b * params.height + py) * params.width + px;
                let base = (row * 9u + k) * c_in;
                for (var c = 0u; c < c_in; c++) {
                    dst[to + c] += src[base + c];
                }
            }
        }
    }
}

@compute @workgroup_size(64, 1, 1)
fn max_pool(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let ho = params.height / 2u;
    let wo = params.width / 2u;
    let total = params.batch * ho * wo;
    for (var i = gid.x; i < total; i += nwg.x * 64u) {
        let p = position(i, ho, wo);
        for (var c = 0u; c < params.channels; c++) {
            var best = src[pixel_index(p.b, 2u * p.y, 2u * p.x, c)];
            var arg = 0u;
            for (var k = 1u; k < 4u; k++) {
                let v = src[pixel_index(p.b, 2u * p.y + k / 2u, 2u * p.x + k % 2u, c)];
                // Strict >: the first maximum wins.
                if (v > best) {
                    best = v;
                    arg = k;
                }
            }
            dst[i * params.channels + c] = best;
            argmax[i * params.channels + c] = arg;
        }
    }
}

@compute @workgroup_size(64, 1, 1)
fn max_pool_grad(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let ho = params.height / 2u;
    let wo = params.width / 2u;
    let total = params.batch * params.height * params.width;
    for (var i = gid.x; i < total; i += nwg.x * 64u) {
        let p = position(i, params.height, params.width);
        let inside = p.y / 2u < ho && p.x / 2u < wo;
        let o = ((p.b * ho + p.y / 2u) * wo + p.x / 2u) * params.channels;
        let tap = (p.y % 2u) * 2u + p.x % 2u;
        for (var c = 0u; c < params.channels; c++) {
            var g = 0.0;
            if (inside && mask[i * params.channels + c] > 0.0 && argmax[o + c] == tap) {
                g = src[o + c];
            }
            dst[i * params.channels + c] = g;
            if (WRITE_T) {
                dst_t[c * total + i] = g;
            }
        }
    }
}

@compute @workgroup_size(64, 1, 1)
fn global_max(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let positions = params.height * params.width;
    for (var i = gid.x; i < params.batch * params.channels; i += nwg.x * 64u) {
        let b = i / params.channels;
        let c = i % params.channels;
        var best = src[b * positions * params.channels + c];
        var arg = 0u;
        for (var p = 1u; p < positions; p++) {
            let v = src[(b * positions + p) * params.channels + c];
            if (v > best) {
                best = v;
                arg = p;
            }
        }
        dst[i] = best;
        argmax[i] = arg;
    }
}

@compute @workgroup_size(64, 1, 1)
fn global_max_grad(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let positions = params.height * params.width;
    let total = params.batch * positions;
    for (var i = gid.x; i < total; i += nwg.x * 64u) {
        let p = i % positions;
        let o = (i / positions) * params.channels;
        for (var c = 0u; c < params.channels; c++) {
            dst[i * params.channels + c] = select(0.0, src[o + c], argmax[o + c] == p);
        }
    }
}
