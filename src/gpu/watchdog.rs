//! The hang watchdog of a [`crate::gpu::GpuContext`]: how long the calling thread has
//! been inside one GPU call (a submit or a wait) without any submission finishing.
//! Waits turn a stall into a [`GpuHang`] error themselves; a submit that blocks behind
//! a hung kernel (lavapipe runs one submission at a time) cannot return, so a process
//! that installs a handler ([`set_hang_handler`], the CLI does) gets a thread that
//! calls it instead.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use web_time::Instant;

use super::context::GpuHang;

/// Called from the watchdog thread when a GPU call has stalled; does not return.
pub type HangHandler = fn(&GpuHang) -> !;

static HANDLER: OnceLock<HangHandler> = OnceLock::new();

/// Installs the process's hang handler (the first call wins); contexts created after
/// it start a watchdog thread.
pub fn set_hang_handler(handler: HangHandler) {
    let _ = HANDLER.set(handler);
}

/// Shared by a context, its completion callbacks and its watchdog thread.
pub(crate) struct Watch {
    start: Instant,
    /// Milliseconds since `start` of the last call entry or finished submission.
    mark_ms: AtomicU64,
    in_call: AtomicBool,
    pub(crate) timeout: Duration,
}

impl Watch {
    pub(crate) fn new(timeout: Duration) -> Arc<Self> {
        let watch = Arc::new(Watch {
            start: Instant::now(),
            mark_ms: AtomicU64::new(0),
            in_call: AtomicBool::new(false),
            timeout,
        });
        if let Some(&handler) = HANDLER.get() {
            let weak = Arc::downgrade(&watch);
            std::thread::spawn(move || watch_thread(weak, handler));
        }
        watch
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Something finished (or a call began): the stall clock restarts.
    pub(crate) fn progress(&self) {
        self.mark_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Marks the calling thread as inside a GPU call until the guard drops.
    pub(crate) fn call(&self) -> CallGuard<'_> {
        self.progress();
        self.in_call.store(true, Ordering::Relaxed);
        CallGuard(self)
    }

    fn stalled(&self) -> bool {
        self.in_call.load(Ordering::Relaxed)
            && self.now_ms() - self.mark_ms.load(Ordering::Relaxed)
                > self.timeout.as_millis() as u64
    }
}

pub(crate) struct CallGuard<'a>(&'a Watch);

impl Drop for CallGuard<'_> {
    fn drop(&mut self) {
        self.0.in_call.store(false, Ordering::Relaxed);
    }
}

/// Checks twice a second until the context is gone.
fn watch_thread(watch: Weak<Watch>, handler: HangHandler) {
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let Some(w) = watch.upgrade() else { return };
        if w.stalled() {
            handler(&GpuHang {
                seconds: w.timeout.as_secs_f64(),
            });
        }
    }
}
