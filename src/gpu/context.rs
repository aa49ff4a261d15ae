//! One `GpuContext` owns the wgpu device and queue, the pipeline cache and the
//! small helpers every launcher needs (buffers, bind groups, one-pass submits,
//! readback). Launchers in `src/gpu/*.rs` build [`Dispatch`]es against it.

use std::collections::HashMap;
use std::mem::ManuallyDrop;
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use wgpu::util::DeviceExt;

use super::shaders::Shaders;
use super::watchdog::Watch;

/// The package that provides a GPU adapter on a machine without a GPU.
pub const SOFTWARE_DRIVER_HINT: &str = "no GPU adapter found. On a machine without a GPU install \
    the software Vulkan driver: `apt-get install mesa-vulkan-drivers libvulkan1` (Debian/Ubuntu), \
    and keep WGPU_BACKEND unset or set it to `vulkan`";

/// How a kernel sees one of its bindings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Binding {
    Uniform,
    ReadOnly,
    ReadWrite,
}

/// Everything needed to compile (or find in the cache) one compute pipeline.
pub struct KernelSpec<'a> {
    /// Unique per (source, entry point, constants): the pipeline cache key.
    pub key: String,
    /// Kernel files ([`crate::gpu::shaders::BUILTIN`] names), concatenated in order,
    /// then `generated` code (the matmul's register-blocked entry point).
    pub parts: &'a [&'a str],
    pub generated: Option<&'a str>,
    pub entry: &'a str,
    pub bindings: &'a [Binding],
    /// Values of WGSL `override` constants.
    pub constants: &'a [(&'a str, f64)],
}

/// A compiled pipeline and the bind group layout it was built with.
pub struct Kernel {
    pub name: String,
    /// The kernel file it is compiled from (the last of its parts).
    pub file: String,
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
    bindings: Vec<Binding>,
}

/// One recorded kernel launch: pipeline, bound buffers and grid size. Cloning is
/// cheap (shared handles), for launches repeated within one submit.
#[derive(Clone)]
pub struct Dispatch {
    kernel: Arc<Kernel>,
    bind_group: wgpu::BindGroup,
    workgroups: [u32; 3],
    /// Bytes of the storage ranges it binds (each moved once at least), and its
    /// floating-point operations where the launcher counts them: for `kernels bench`.
    bytes: u64,
    flops: u64,
    /// What it computes, where the launcher says more than the kernel name.
    label: Option<String>,
}

impl Dispatch {
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        pass.set_pipeline(&self.kernel.pipeline);
        pass.set_bind_group(0, &self.bind_group, &[]);
        let [x, y, z] = self.workgroups;
        pass.dispatch_workgroups(x, y, z);
    }

    pub fn kernel_name(&self) -> &str {
        &self.kernel.name
    }

    pub fn kernel_file(&self) -> &str {
        &self.kernel.file
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn flops(&self) -> u64 {
        self.flops
    }

    /// Replaces the counted work (a launcher that binds one range twice, or counts
    /// its arithmetic) and names what the dispatch computes.
    pub fn with_work(self, flops: u64, bytes: u64, label: String) -> Self {
        Dispatch {
            flops,
            bytes,
            label: Some(label),
            ..self
        }
    }

    /// The launcher's label, else the kernel name.
    pub fn label(&self) -> &str {
        self.label.as_deref().unwrap_or(&self.kernel.name)
    }
}

/// A range of a buffer of 4-byte elements (f32 or u32), in elements.
#[derive(Clone, Copy)]
pub struct Slice<'a> {
    pub buffer: &'a wgpu::Buffer,
    pub offset: u64,
    pub len: u64,
}

impl<'a> Slice<'a> {
    pub fn whole(buffer: &'a wgpu::Buffer) -> Self {
        Slice {
            buffer,
            offset: 0,
            len: buffer.size() / 4,
        }
    }

    pub fn new(buffer: &'a wgpu::Buffer, offset: usize, len: usize) -> Self {
        Slice {
            buffer,
            offset: offset as u64,
            len: len as u64,
        }
    }
}

pub struct GpuContext {
    /// Dropped by hand: not at all after a hung wait (see the `Drop` impl).
    pub device: ManuallyDrop<wgpu::Device>,
    pub queue: ManuallyDrop<wgpu::Queue>,
    pub adapter_info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    /// Lanes per subgroup where the device has subgroup operations of one fixed size.
    pub subgroup_size: Option<u32>,
    pipelines: Mutex<HashMap<String, Arc<Kernel>>>,
    /// The kernel sources, built-in or overridden from a directory.
    pub shaders: Shaders,
    /// First uncaptured error or device loss, reported by [`GpuContext::check`].
    fault: Arc<Mutex<Option<String>>>,
    /// Submissions the GPU has finished (the watchdog of [`GpuContext::wait`]).
    finished: Arc<AtomicU64>,
    /// How long a GPU call may see no submission finish before it is an error.
    watch: Arc<Watch>,
    /// Set when a wait gave up on a kernel that did not end.
    hung: AtomicBool,
    /// Bound in place of optional read-only / read-write bindings a variant does not use;
    /// binding `i` gets its own aligned slot of `dummy_rw`, since WebGPU refuses two
    /// writable bindings of one range in a bind group.
    dummy_ro: wgpu::Buffer,
    dummy_rw: wgpu::Buffer,
}

/// Bindings per kernel that can take a read-write dummy.
const DUMMY_SLOTS: u64 = 16;

/// The error of a wait that saw no GPU work finish for `seconds`. The work is still
/// running: a process that meets it should exit without waiting for the driver.
#[derive(Debug)]
pub struct GpuHang {
    pub seconds: f64,
}

impl std::fmt::Display for GpuHang {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the GPU finished no work for {} s: a kernel that does not end (an edited \
             loop?) or a stalled driver. Set {GPU_TIMEOUT_ENV} (seconds) to allow longer",
            self.seconds
        )
    }
}

impl std::error::Error for GpuHang {}

/// Seconds a wait may see no GPU work finish before it fails (default 120).
pub const GPU_TIMEOUT_ENV: &str = "CUPBEARER_GPU_TIMEOUT";

/// Set to `0` to leave the device's subgroup operations unused (the kernels that use
/// them fall back to plain loads, with the same results): for A/B timing, or a driver
/// whose subgroups misbehave.
pub const SUBGROUPS_ENV: &str = "CUPBEARER_SUBGROUPS";

fn gpu_timeout() -> Result<Duration> {
    match std::env::var(GPU_TIMEOUT_ENV) {
        Err(_) => Ok(Duration::from_secs(120)),
        Ok(v) => match v.trim().parse::<f64>() {
            Ok(s) if s.is_finite() && s > 0.0 => Ok(Duration::from_secs_f64(s)),
            _ => bail!("{GPU_TIMEOUT_ENV}={v}: expected a number of seconds > 0"),
        },
    }
}

fn adapter_rank(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    }
}

impl GpuContext {
    /// Picks an adapter (honouring `WGPU_BACKEND`; hardware GPUs before software
    /// ones) and creates a device with the adapter's full limits; kernel files come
    /// from [`Shaders::from_environment`] (`--shader-dir`, `CUPBEARER_SHADER_DIR`).
    pub fn new() -> Result<Self> {
        Self::with_shaders(Shaders::from_environment()?)
    }

    /// [`GpuContext::new`] compiling `shaders`.
    pub fn with_shaders(shaders: Shaders) -> Result<Self> {
        block_on(Self::create(shaders))
    }

    /// [`GpuContext::with_shaders`] as a future: how the browser, which cannot block,
    /// creates its context.
    pub async fn create(shaders: Shaders) -> Result<Self> {
        let instance =
            wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        let mut adapters = instance.enumerate_adapters(wgpu::Backends::all()).await;
        if adapters.is_empty() {
            #[cfg(target_arch = "wasm32")]
            bail!(
                "the browser offered no WebGPU adapter: WebGPU is disabled or unsupported \
                 here (Chromium: chrome://gpu; headless: --enable-unsafe-webgpu)"
            );
            #[cfg(not(target_arch = "wasm32"))]
            {
                let backend = std::env::var("WGPU_BACKEND").unwrap_or_else(|_| "any".into());
                bail!("{SOFTWARE_DRIVER_HINT} (WGPU_BACKEND={backend})");
            }
        }
        // Stable sort: among equals keep wgpu's order (Vulkan before GL).
        adapters.sort_by_key(|a| adapter_rank(a.get_info().device_type));
        let adapter = adapters.swap_remove(0);
        let adapter_info = adapter.get_info();
        let limits = adapter.limits();
        // Subgroups only at one fixed size: kernels that use them assume a lane count.
        let subgroup_size = (std::env::var(SUBGROUPS_ENV).as_deref() != Ok("0")
            && adapter.features().contains(wgpu::Features::SUBGROUP)
            && adapter_info.subgroup_min_size == adapter_info.subgroup_max_size)
            .then_some(adapter_info.subgroup_min_size);
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("cupbearer"),
                required_features: match subgroup_size {
                    Some(_) => wgpu::Features::SUBGROUP,
                    None => wgpu::Features::empty(),
                },
                required_limits: limits.clone(),
                ..Default::default()
            })
            .await
            .with_context(|| format!("requesting a device from adapter {}", adapter_info.name))?;

        let fault: Arc<Mutex<Option<String>>> = Arc::default();
        let f = fault.clone();
        device.on_uncaptured_error(Arc::new(move |e| {
            // wgpu's Display says only "Validation Error"; the why is in the sources.
            let mut msg = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                msg = format!("{msg}: {s}");
                source = s.source();
            }
            f.lock().unwrap().get_or_insert(msg);
        }));
        let f = fault.clone();
        device.set_device_lost_callback(move |reason, msg| {
            // The loss explains any error that follows it, so it is what is reported.
            *f.lock().unwrap() = Some(format!("GPU device lost ({reason:?}): {msg}"));
        });
        let dummy = |label, size| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage: wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            })
        };
        let slot = limits.min_storage_buffer_offset_alignment as u64;
        let (dummy_ro, dummy_rw) = (dummy("dummy_ro", 16), dummy("dummy_rw", slot * DUMMY_SLOTS));
        Ok(GpuContext {
            finished: Arc::default(),
            watch: Watch::new(gpu_timeout()?),
            hung: AtomicBool::new(false),
            device: ManuallyDrop::new(device),
            queue: ManuallyDrop::new(queue),
            adapter_info,
            limits,
            subgroup_size,
            pipelines: Mutex::default(),
            shaders,
            fault,
            dummy_ro,
            dummy_rw,
        })
    }

    /// A software rasteriser (lavapipe, llvmpipe, WARP): pick barrier-free kernels.
    pub fn is_cpu(&self) -> bool {
        self.adapter_info.device_type == wgpu::DeviceType::Cpu
    }

    /// "name (backend, type)", for logs and metrics files.
    pub fn adapter_name(&self) -> String {
        let i = &self.adapter_info;
        format!("{} ({:?}, {:?})", i.name, i.backend, i.device_type)
    }

    /// Returns the first asynchronous GPU error (validation error, device loss).
    pub fn check(&self) -> Result<()> {
        match self.fault.lock().unwrap().clone() {
            Some(msg) => Err(anyhow!("GPU error: {msg}")),
            None => Ok(()),
        }
    }

    /// Compiles `spec` once per process; compile errors are returned, not panicked.
    pub fn kernel(&self, spec: &KernelSpec<'_>) -> Result<Arc<Kernel>> {
        if let Some(k) = self.pipelines.lock().unwrap().get(&spec.key) {
            return Ok(k.clone());
        }
        let mut source: String = spec.parts.iter().map(|p| self.shaders.get(p)).collect();
        source.push_str(spec.generated.unwrap_or(""));
        if let Err(e) = crate::gpu::shaders::validate(&source, spec, &self.shaders) {
            bail!("compiling kernel {}: {e}", spec.key);
        }
        // Popping a scope waits for the GPU process, which the browser cannot do
        // synchronously: there naga's validation above and the uncaptured-error
        // handler ([`GpuContext::check`]) report what a scope would.
        #[cfg(not(target_arch = "wasm32"))]
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = self
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(&spec.key),
                source: wgpu::ShaderSource::Wgsl(source.as_str().into()),
            });
        let entries: Vec<_> = spec
            .bindings
            .iter()
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupLayoutEntry {
                binding: i as u32,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: match b {
                    Binding::Uniform => wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Uniform,
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                    Binding::ReadOnly | Binding::ReadWrite => wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Storage {
                            read_only: *b == Binding::ReadOnly,
                        },
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                },
                count: None,
            })
            .collect();
        let layout = self
            .device
            .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                label: Some(&spec.key),
                entries: &entries,
            });
        let pipeline_layout = self
            .device
            .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some(&spec.key),
                bind_group_layouts: &[Some(&layout)],
                immediate_size: 0,
            });
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(&spec.key),
                layout: Some(&pipeline_layout),
                module: &module,
                entry_point: Some(spec.entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants: spec.constants,
                    zero_initialize_workgroup_memory: false,
                },
                cache: None,
            });
        #[cfg(not(target_arch = "wasm32"))]
        if let Some(err) = pollster::block_on(scope.pop()) {
            bail!("compiling kernel {}: {err}", spec.key);
        }
        let kernel = Arc::new(Kernel {
            name: spec.key.clone(),
            file: spec.parts.last().copied().unwrap_or_default().to_string(),
            pipeline,
            layout,
            bindings: spec.bindings.to_vec(),
        });
        self.pipelines
            .lock()
            .unwrap()
            .insert(spec.key.clone(), kernel.clone());
        Ok(kernel)
    }

    /// Binds `resources` (None = the variant does not use that binding) and fixes the grid.
    pub fn dispatch(
        &self,
        kernel: &Arc<Kernel>,
        resources: &[Option<Slice<'_>>],
        workgroups: [u32; 3],
    ) -> Result<Dispatch> {
        if resources.len() != kernel.bindings.len() {
            bail!(
                "kernel {} takes {} bindings, got {}",
                kernel.name,
                kernel.bindings.len(),
                resources.len()
            );
        }
        let align = self.limits.min_storage_buffer_offset_alignment as u64;
        let max_binding = self.limits.max_storage_buffer_binding_size;
        let mut entries = Vec::with_capacity(resources.len());
        let mut bytes = 0;
        for (i, (res, kind)) in resources.iter().zip(&kernel.bindings).enumerate() {
            let buffer_binding = match res {
                Some(s) => {
                    let (offset, size) = (s.offset * 4, s.len.max(1) * 4);
                    if *kind != Binding::Uniform {
                        bytes += size;
                    }
                    if offset % align != 0 {
                        bail!(
                            "kernel {} binding {i}: offset {offset} B not a multiple of {align} B",
                            kernel.name
                        );
                    }
                    if size > max_binding {
                        bail!(
                            "kernel {} binding {i}: {} MiB exceeds this adapter's storage binding \
                             limit of {} MiB; use a smaller batch or data set",
                            kernel.name,
                            size >> 20,
                            max_binding >> 20
                        );
                    }
                    if offset + size > s.buffer.size() {
                        bail!(
                            "kernel {} binding {i}: range {offset}..{} B beyond buffer of {} B",
                            kernel.name,
                            offset + size,
                            s.buffer.size()
                        );
                    }
                    wgpu::BufferBinding {
                        buffer: s.buffer,
                        offset,
                        size: NonZeroU64::new(size),
                    }
                }
                None => match kind {
                    Binding::ReadWrite if (i as u64) < DUMMY_SLOTS => wgpu::BufferBinding {
                        buffer: &self.dummy_rw,
                        offset: i as u64 * align,
                        size: NonZeroU64::new(16),
                    },
                    Binding::ReadOnly => self.dummy_ro.as_entire_buffer_binding(),
                    _ => bail!("kernel {} binding {i}: missing", kernel.name),
                },
            };
            entries.push(wgpu::BindGroupEntry {
                binding: i as u32,
                resource: wgpu::BindingResource::Buffer(buffer_binding),
            });
        }
        let bind_group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(&kernel.name),
            layout: &kernel.layout,
            entries: &entries,
        });
        Ok(Dispatch {
            kernel: kernel.clone(),
            bind_group,
            workgroups,
            bytes,
            flops: 0,
            label: None,
        })
    }

    /// Records `ops` into one compute pass of one encoder and submits it.
    pub fn submit<'a>(&self, ops: impl IntoIterator<Item = &'a Dispatch>) -> wgpu::SubmissionIndex {
        let mut encoder = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor::default());
            for op in ops {
                op.record(&mut pass);
            }
        }
        self.submit_commands(encoder.finish())
    }

    /// Submits `commands`, counting its completion for the watchdog.
    fn submit_commands(&self, commands: wgpu::CommandBuffer) -> wgpu::SubmissionIndex {
        let _call = self.watch.call();
        let index = self.queue.submit([commands]);
        let (finished, watch) = (self.finished.clone(), self.watch.clone());
        self.queue.on_submitted_work_done(move || {
            finished.fetch_add(1, Ordering::Relaxed);
            watch.progress();
        });
        index
    }

    /// Blocks until submission `index` (or everything, for None) has finished. A wait
    /// in which no submission finishes for [`GPU_TIMEOUT_ENV`] seconds is an error (a
    /// kernel that does not end), as is a lost device.
    pub fn wait(&self, index: Option<wgpu::SubmissionIndex>) -> Result<()> {
        let _call = self.watch.call();
        let mut seen = self.finished.load(Ordering::Relaxed);
        loop {
            let poll = wgpu::PollType::Wait {
                submission_index: index.clone(),
                timeout: Some(self.watch.timeout),
            };
            match self.device.poll(poll) {
                Ok(_) => break,
                Err(wgpu::PollError::Timeout) => {
                    // Fires the callbacks of what did finish, then looks for progress.
                    let _ = self.device.poll(wgpu::PollType::Poll);
                    let now = self.finished.load(Ordering::Relaxed);
                    if now == seen {
                        self.check()?;
                        self.hung.store(true, Ordering::Relaxed);
                        return Err(GpuHang {
                            seconds: self.watch.timeout.as_secs_f64(),
                        }
                        .into());
                    }
                    seen = now;
                }
                Err(e) => return Err(e).context("waiting for the GPU"),
            }
        }
        self.check()
    }

    /// A storage buffer initialised from `data` (at least 16 bytes, so empty tensors bind).
    pub fn buffer_from<T: bytemuck::Pod>(&self, label: &str, data: &[T]) -> Result<wgpu::Buffer> {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        self.check_size(label, bytes.len() as u64)?;
        if bytes.len() >= 16 {
            return Ok(self
                .device
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some(label),
                    contents: bytes,
                    usage: storage_usage(),
                }));
        }
        let mut padded = bytes.to_vec();
        padded.resize(16, 0);
        Ok(self
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents: &padded,
                usage: storage_usage(),
            }))
    }

    /// A zero-filled storage buffer of `len` 4-byte elements.
    pub fn zeros(&self, label: &str, len: usize) -> Result<wgpu::Buffer> {
        let size = ((len as u64) * 4).max(16);
        self.check_size(label, size)?;
        Ok(self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage: storage_usage(),
            mapped_at_creation: false,
        }))
    }

    /// A uniform buffer holding `value`, rewritable with `queue.write_buffer`.
    pub fn uniform<T: bytemuck::Pod>(&self, label: &str, value: &T) -> wgpu::Buffer {
        self.device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents: bytemuck::bytes_of(value),
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            })
    }

    fn check_size(&self, label: &str, size: u64) -> Result<()> {
        let max = self.limits.max_buffer_size;
        if size > max {
            bail!(
                "buffer {label}: {} MiB exceeds this adapter's maximum buffer size of {} MiB",
                size >> 20,
                max >> 20
            );
        }
        Ok(())
    }

    /// Copies `slice` back to the host. Blocks: call at command or epoch boundaries only
    /// (in the browser, use [`GpuContext::read_async`]).
    pub fn read<T: bytemuck::Pod>(&self, slice: Slice<'_>) -> Result<Vec<T>> {
        block_on(self.read_async(slice))
    }

    /// Copies `slice` back to the host once the GPU has written it.
    pub async fn read_async<T: bytemuck::Pod>(&self, slice: Slice<'_>) -> Result<Vec<T>> {
        let bytes = slice.len * 4;
        if bytes == 0 {
            return Ok(Vec::new());
        }
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut encoder = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
        encoder.copy_buffer_to_buffer(slice.buffer, slice.offset * 4, &staging, 0, bytes);
        self.submit_commands(encoder.finish());
        let (tx, rx) = futures_channel::oneshot::channel();
        staging.slice(..).map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.finish(None).await?;
        rx.await
            .context("GPU readback channel closed")?
            .context("mapping a readback buffer")?;
        let data = {
            let view = staging
                .slice(..)
                .get_mapped_range()
                .context("reading a mapped buffer")?;
            bytemuck::cast_slice(&view).to_vec()
        };
        staging.unmap();
        Ok(data)
    }

    /// Resolves once submission `index` (everything, for None) has finished: natively
    /// [`GpuContext::wait`]; in the browser, where the device is polled by the page's
    /// event loop, once all work submitted so far is done.
    pub async fn finish(&self, index: Option<wgpu::SubmissionIndex>) -> Result<()> {
        #[cfg(not(target_arch = "wasm32"))]
        return self.wait(index);
        #[cfg(target_arch = "wasm32")]
        {
            let _ = index;
            let (tx, rx) = futures_channel::oneshot::channel();
            self.queue.on_submitted_work_done(move || {
                let _ = tx.send(());
            });
            rx.await.context("the GPU queue was dropped")?;
            self.check()
        }
    }
}

/// What a blocking call says in the browser.
pub const BROWSER_NEEDS_ASYNC: &str = "this step waits for the GPU, which a web page cannot do \
    synchronously: the browser build runs only the library's async paths";

/// Runs `future` to completion at a synchronous edge of the library: natively by
/// blocking (wgpu's native callbacks fire inside [`GpuContext::wait`]); in the browser
/// only if it completes without waiting for the event loop, else an error that says so.
pub fn block_on<T>(future: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    #[cfg(not(target_arch = "wasm32"))]
    return pollster::block_on(future);
    #[cfg(target_arch = "wasm32")]
    {
        use std::task::{Context, Poll, Waker};
        let mut future = std::pin::pin!(future);
        match future
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
        {
            Poll::Ready(r) => r,
            Poll::Pending => bail!(BROWSER_NEEDS_ASYNC),
        }
    }
}

impl Drop for GpuContext {
    /// Dropping a queue waits for its work to finish, which a hung kernel never does:
    /// after a hung wait the device and queue are leaked instead, so that the command
    /// can report the error and exit (taking the driver's threads with it).
    fn drop(&mut self) {
        if !self.hung.load(Ordering::Relaxed) {
            // SAFETY: dropped once, here, and never used again.
            unsafe {
                ManuallyDrop::drop(&mut self.device);
                ManuallyDrop::drop(&mut self.queue);
            }
        }
    }
}

fn storage_usage() -> wgpu::BufferUsages {
    wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST
}

impl GpuContext {
    /// Grid for a 1-D kernel over `n` items: one invocation per item up to the grid
    /// limit, beyond which invocations loop with stride `num_workgroups.x * workgroup`.
    /// (Fewer, looping workgroups were slower on lavapipe too: Adam 3.0 vs 1.7 ms.)
    pub fn grid_1d(&self, n: usize, workgroup: u32) -> [u32; 3] {
        let groups = (n as u64).div_ceil(workgroup as u64).max(1);
        [groups.min(65535) as u32, 1, 1]
    }
}
