//! Log setup, and the one rule for colour: ANSI escapes only on a terminal. A file, a pipe,
//! a container log or journald gets plain text (escapes there end up in the collector as
//! `ESC[2m` noise); JSON logs never carry them; `NO_COLOR` (no-color.org) and `TERM=dumb`
//! turn colour off on a terminal too.

use std::ffi::OsStr;
use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Whether output to `stream` may be coloured, from the environment as it is.
pub fn colour(stream: &impl IsTerminal) -> bool {
    colour_wanted(
        stream.is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
        std::env::var_os("TERM").as_deref(),
    )
}

/// The rule itself: a terminal, `NO_COLOR` unset or empty, and not `TERM=dumb`.
pub fn colour_wanted(terminal: bool, no_color: Option<&OsStr>, term: Option<&OsStr>) -> bool {
    terminal && no_color.is_none_or(OsStr::is_empty) && term != Some(OsStr::new("dumb"))
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`): text (coloured only on a
/// terminal) or one JSON object per line.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let filter = crate::events::quiet_kube_http_errors(filter);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        // Without ANSI, also for fields formatted on the way in (error chains, spans).
        LogFormat::Json => builder.with_ansi(false).json().flatten_event(true).init(),
        LogFormat::Text => builder.with_ansi(colour(&std::io::stderr())).init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_that_wants_it() {
        let s = |v: &'static str| Some(OsStr::new(v));
        assert!(colour_wanted(true, None, s("xterm-256color")));
        assert!(colour_wanted(true, None, None));
        assert!(colour_wanted(true, s(""), s("xterm")), "empty NO_COLOR");
        assert!(!colour_wanted(false, None, s("xterm")), "a file or a pipe");
        assert!(!colour_wanted(true, s("1"), s("xterm")), "NO_COLOR");
        assert!(!colour_wanted(true, None, s("dumb")));
    }
}
