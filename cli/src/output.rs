//! Printing for the commands an operator pipes (`trellis status | head -1`).
//!
//! `println!` panics, with a backtrace, once the reader has gone: Rust ignores SIGPIPE,
//! so a closed pipe comes back as an EPIPE error. Restoring SIGPIPE is no answer here,
//! as a gRPC socket whose peer died would then kill the process too.

use std::io::Write;

/// What a command does when its output is closed.
#[derive(Debug, Clone, Copy)]
pub enum OnClosed {
    /// Nothing left to undo: end at once, quietly, with success (the reader took what
    /// it wanted, as `head` does).
    Exit,
    /// Work under way must still clean up after itself (a benchmark's pods): go on,
    /// the line is lost.
    Drop,
}

/// Writes one line to stdout.
pub fn line(args: std::fmt::Arguments<'_>, on_closed: OnClosed) {
    let mut stdout = std::io::stdout().lock();
    let written = stdout
        .write_fmt(args)
        .and_then(|()| stdout.write_all(b"\n"))
        .and_then(|()| stdout.flush());
    if let Err(error) = written {
        match on_closed {
            OnClosed::Exit if error.kind() == std::io::ErrorKind::BrokenPipe => {
                std::process::exit(0)
            }
            OnClosed::Exit => {
                error_line(format_args!("cannot write the output: {error}"));
                std::process::exit(1)
            }
            OnClosed::Drop => {}
        }
    }
}

/// Writes one line to stderr; a closed stderr loses it rather than ending the process.
pub fn error_line(args: std::fmt::Arguments<'_>) {
    let mut stderr = std::io::stderr().lock();
    let _ = stderr
        .write_fmt(args)
        .and_then(|()| stderr.write_all(b"\n"));
}

/// `println!` that ends the process quietly when stdout is closed.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::output::line(format_args!($($arg)*), $crate::output::OnClosed::Exit)
    };
}

/// `println!` that loses the line when stdout is closed and goes on.
macro_rules! outln_or_drop {
    ($($arg:tt)*) => {
        $crate::output::line(format_args!($($arg)*), $crate::output::OnClosed::Drop)
    };
}

/// `eprintln!` that never panics.
macro_rules! errln {
    ($($arg:tt)*) => {
        $crate::output::error_line(format_args!($($arg)*))
    };
}

pub(crate) use {errln, outln, outln_or_drop};
