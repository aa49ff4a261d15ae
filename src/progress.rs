//! Progress bars and status lines: on stderr, or in builds without the `native` feature
//! (the browser's) to a sink the page installs; silent when disabled.

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

/// What a build without a terminal (the browser's) passes to its [`set_sink`].
#[cfg(not(feature = "native"))]
pub enum Event<'a> {
    Bar {
        message: &'a str,
        position: u64,
        length: u64,
    },
    Note(&'a str),
}

#[cfg(not(feature = "native"))]
type Sink = Box<dyn Fn(Event<'_>)>;

#[cfg(not(feature = "native"))]
thread_local! {
    static SINK: std::cell::RefCell<Option<Sink>> = const { std::cell::RefCell::new(None) };
}

/// Where this thread's bars and notes go (a web page's status line); none by default.
#[cfg(not(feature = "native"))]
pub fn set_sink(sink: impl Fn(Event<'_>) + 'static) {
    SINK.with(|s| *s.borrow_mut() = Some(Box::new(sink)));
}

#[cfg(not(feature = "native"))]
fn emit(event: Event<'_>) {
    SINK.with(|s| {
        if let Some(sink) = &*s.borrow() {
            sink(event)
        }
    });
}

/// Without a terminal to draw on, a bar that reports its position to the sink.
#[cfg(not(feature = "native"))]
pub struct ProgressBar {
    message: Option<String>,
    length: u64,
    position: std::cell::Cell<u64>,
}

#[cfg(not(feature = "native"))]
impl ProgressBar {
    pub fn inc(&self, n: u64) {
        let position = self.position.get() + n;
        self.position.set(position);
        if let Some(message) = &self.message {
            emit(Event::Bar {
                message,
                position,
                length: self.length,
            });
        }
    }
    pub fn finish_and_clear(&self) {}
}

#[cfg(not(feature = "native"))]
pub fn bar(enabled: bool, len: u64, message: &str) -> ProgressBar {
    ProgressBar {
        message: enabled.then(|| message.to_string()),
        length: len,
        position: Default::default(),
    }
}

pub fn note(enabled: bool, message: &str) {
    #[cfg(feature = "native")]
    if enabled {
        eprintln!("{message}");
    }
    #[cfg(not(feature = "native"))]
    if enabled {
        emit(Event::Note(message));
    }
}
