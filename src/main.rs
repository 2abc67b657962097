//! The `fastsync` binary: parse, run, exit with the documented code.

fn main() {
    // An internal bug must still end in one line, not a backtrace.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        eprintln!("fastsync: internal error: {msg}{at} (please report this)");
    }));
    std::process::exit(fastsync::cli::main());
}
