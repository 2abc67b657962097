//! The progress bar: bytes, files, rate and ETA on a terminal; nothing otherwise.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A progress bar on stderr when it is a terminal (and not `-q`); a no-op otherwise.
pub struct Progress {
    bar: Option<ProgressBar>,
    files: u64,
    message_at: Instant,
}

impl Progress {
    pub fn new(wanted: bool) -> Self {
        let bar = (wanted && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr_with_hz(10));
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:30.cyan/blue} {bytes:>10}/{total_bytes:<10} {binary_bytes_per_sec:>12} {msg} ETA {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar
        });
        Progress { bar, files: 0, message_at: Instant::now() }
    }

    /// More bytes discovered by the walk (the total grows while the walk streams).
    pub fn add_total(&self, bytes: u64) {
        if let Some(b) = &self.bar {
            b.inc_length(bytes);
        }
    }

    pub fn inc(&self, bytes: u64) {
        if let Some(b) = &self.bar {
            b.inc(bytes);
        }
    }

    pub fn file_done(&mut self) {
        self.files += 1;
        if let Some(b) = self.bar.as_ref().filter(|_| self.message_at.elapsed() > Duration::from_millis(100)) {
            b.set_message(format!("{} files", self.files));
            self.message_at = Instant::now();
        }
    }

    /// Print a line above the bar (or plainly when there is none).
    pub fn println(&self, line: &str) {
        match &self.bar {
            Some(b) => b.suspend(|| eprintln!("{line}")),
            None => eprintln!("{line}"),
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
