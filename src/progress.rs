//! Progress bars and status lines on stderr (silent when disabled, and in builds without
//! the `native` feature, such as the browser's).

#[cfg(feature = "native")]
pub use indicatif::ProgressBar;

/// A bar of `len` steps; hidden when `enabled` is false or stderr is not a terminal.
#[cfg(feature = "native")]
pub fn bar(enabled: bool, len: u64, message: &str) -> ProgressBar {
    use indicatif::ProgressStyle;
    if !enabled {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{msg:>12} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
            .expect("static template is valid")
            .progress_chars("=> "),
    );
    bar.set_message(message.to_string());
    bar
}

/// Without a terminal to draw on, a bar that counts nothing.
#[cfg(not(feature = "native"))]
pub struct ProgressBar;

#[cfg(not(feature = "native"))]
impl ProgressBar {
    pub fn inc(&self, _: u64) {}
    pub fn finish_and_clear(&self) {}
}

#[cfg(not(feature = "native"))]
pub fn bar(_enabled: bool, _len: u64, _message: &str) -> ProgressBar {
    ProgressBar
}

pub fn note(enabled: bool, message: &str) {
    if enabled {
        eprintln!("{message}");
    }
}
