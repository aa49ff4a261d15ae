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

fn pixel_index(b: u32, y: u32, x: u32, c: u32) -> u32 {
    return ((b * params.height + y) * params.width + x) * params.channels + c;
}

@compute @workgroup_size(64, 1, 1)
fn im2col(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let cols = 9u * params.channels;
    let total = params.batch * params.height * params.width * cols;
    for (var i = gid.x; i < total; i += nwg.x * 64u) {
        let row = i / cols;
        let col = i % cols;
        let k = col / params.channels;
        let c = col % params.channels;
        let x = row % params.width;
        let y = (row / params.width) % params.height;
        let b = row / (params.width * params.height);
        // Unsigned wrap-around makes out-of-range coordinates large.
        let sy = y + k / 3u - 1u;
        let sx = x + k % 3u - 1u;
        var v = 0.0;
        if (sy < params.height && sx < params.width) {
            v = src[pixel_index(b, sy, sx, c)];
        }
        dst[i] = v;
    }
}

@compute @workgroup_size(64, 1, 1)
fn col2im(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let cols = 9u * params.channels;
    let total = params.batch * params.height * params.width * params.channels;
    for (var i = gid.x; i < total; i += nwg.x * 64u) {
        let c = i % params.channels;
        let x = (i / params.channels) % params.width;
        let y = (i / (params.channels * params.width)) % params.height;
        let b = i / (params.channels * params.width * params.height);
        var s = 0.0;
        for (var k = 0u; k < 9u; k++) {
            // The output position whose window puts this pixel at tap k.
            let py = y + 1u - k / 3u;
            let px = x + 1u - k % 3u;
            if (py < params.height && px < params.width) {
                let row = (b * params.height + py) * params.width + px;
                s += src[row * cols + k * params.channels + c];
            }
        }
        dst[i] = s;
    }
}

@compute @workgroup_size(64, 1, 1)
fn max_pool(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let ho = params.height / 2u;
    let wo = params.width / 2u;
    let total = params.batch * ho * wo * params.channels;
    for (var i = gid.x; i < total; i += nwg.x * 64u) {
        let c = i % params.channels;
        let x = (i / params.channels) % wo;
        let y = (i / (params.channels * wo)) % ho;
        let b = i / (params.channels * wo * ho);
        var best = src[pixel_index(b, 2u * y, 2u * x, c)];
        var arg = 0u;
        for (var k = 1u; k < 4u; k++) {
            let v = src[pixel_index(b, 2u * y + k / 2u, 2u * x + k % 2u, c)];
            // Strict >: the first maximum wins.
            if (v > best) {
                best = v;
                arg = k;
            }
        }
        dst[i] = best;
        argmax[i] = arg;
    }
}

@compute @workgroup_size(64, 1, 1)
fn max_pool_grad(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let ho = params.height / 2u;
    let wo = params.width / 2u;
    let total = params.batch * params.height * params.width * params.channels;
    for (var i = gid.x; i < total; i += nwg.x * 64u) {
        let c = i % params.channels;
        let x = (i / params.channels) % params.width;
        let y = (i / (params.channels * params.width)) % params.height;
        let b = i / (params.channels * params.width * params.height);
        var g = 0.0;
        if (y / 2u < ho && x / 2u < wo && mask[i] > 0.0) {
            let o = ((b * ho + y / 2u) * wo + x / 2u) * params.channels + c;
            if (argmax[o] == (y % 2u) * 2u + x % 2u) {
                g = src[o];
            }
        }
        dst[i] = g;
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
    let total = params.batch * positions * params.channels;
    for (var i = gid.x; i < total; i += nwg.x * 64u) {
        let c = i % params.channels;
        let p = (i / params.channels) % positions;
        let b = i / (params.channels * positions);
        let o = b * params.channels + c;
        dst[i] = select(0.0, src[o], argmax[o] == p);
    }
}
