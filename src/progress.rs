//! Progress bars and status lines on stderr (silent when disabled).

use indicatif::{ProgressBar, ProgressStyle};

/// A bar of `len` steps; hidden when `enabled` is false or stderr is not a terminal.
pub fn bar(enabled: bool, len: u64, message: &str) -> ProgressBar {
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

pub fn note(enabled: bool, message: &str) {
    if enabled {
        eprintln!("{message}");
    }
}
