// Per-step parameters, rewritten by the host (queue.write_buffer) before each submit.
struct Step {
    epoch: u32,
    // Position of this batch in the epoch's sample order.
    batch_offset: u32,
    _pad0: u32,
    _pad1: u32,
    learning_rate: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    // Adam bias corrections 1 - beta^t.
    bias_correction1: f32,
    bias_correction2: f32,
    _pad2: f32,
    _pad3: f32,
}
