//! The debug subcommands of the `oomguard` binary, one module each, and what they share:
//! aligned tables that fit [`WIDTH`] columns (coloured only on a terminal), sizes for
//! humans, JSON output, and one clear line plus a non-zero exit status when something is
//! missing.
//!
//! `--json` output is stable: fields are only ever added. README.md, "Debug CLI", documents it.

pub mod args;
pub mod bpf;
pub mod cgroups;
pub mod doctor;
pub mod events;

use std::fmt::Display;
use std::path::Path;
use std::process::ExitCode;

/// Human output fits this many columns.
pub const WIDTH: usize = 100;

/// `error` and its sources on one line.
pub use crate::error_line;

/// Prints `error` and its sources as one line on stderr; exit status 1.
pub fn fail(error: &dyn std::error::Error) -> ExitCode {
    eprintln!("oomguard: {}", error_line(error));
    ExitCode::FAILURE
}

/// Prints `value` as pretty JSON on stdout.
pub fn print_json(value: &impl serde::Serialize) -> ExitCode {
    match serde_json::to_string_pretty(value) {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

/// Column alignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// A cell's look on a terminal (see [`crate::telemetry::colour`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Paint {
    Bold,
    Red,
    Yellow,
    Green,
    Dim,
}

impl Paint {
    fn sgr(self) -> &'static str {
        match self {
            Paint::Bold => "\x1b[1m",
            Paint::Red => "\x1b[31m",
            Paint::Yellow => "\x1b[33m",
            Paint::Green => "\x1b[32m",
            Paint::Dim => "\x1b[2m",
        }
    }

    /// `text` in this paint, reset after.
    pub fn apply(self, text: &str) -> String {
        format!("{}{text}\x1b[0m", self.sgr())
    }
}

/// Whether stdout takes colour: a terminal, and the environment does not refuse it.
pub fn colour_stdout() -> bool {
    crate::telemetry::colour(&std::io::stdout())
}

/// Chooses a column's paint from the cell's text (`None`: plain).
pub type Painter = fn(&str) -> Option<Paint>;

/// A table of text cells, rendered with aligned columns within [`WIDTH`]. The one column
/// marked elastic (a path, a detail) is shortened from the left when the table is too wide.
/// Coloured, the header is bold and painted columns take their cell's paint; widths and
/// cuts are those of the plain text, so both renderings line up the same.
pub struct Table {
    headers: Vec<(&'static str, Align)>,
    rows: Vec<Vec<String>>,
    elastic: Option<usize>,
    painters: Vec<(usize, Painter)>,
}

impl Table {
    pub fn new(headers: &[(&'static str, Align)]) -> Table {
        Table {
            headers: headers.to_vec(),
            rows: Vec::new(),
            elastic: None,
            painters: Vec::new(),
        }
    }

    /// Column `index` is painted by `painter` when the table is coloured.
    pub fn paint(mut self, index: usize, painter: Painter) -> Table {
        self.painters.push((index, painter));
        self
    }

    /// Column `index` gives way when the table is wider than [`WIDTH`].
    pub fn elastic(mut self, index: usize) -> Table {
        self.elastic = Some(index);
        self
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The rendered lines, header first; no trailing spaces; no colour.
    pub fn lines(&self) -> Vec<String> {
        self.render(false)
    }

    /// The rendered lines, with ANSI colour when `colour`.
    pub fn render(&self, colour: bool) -> Vec<String> {
        let n = self.headers.len();
        let mut widths: Vec<usize> = self.headers.iter().map(|(h, _)| h.len()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let total = widths.iter().sum::<usize>() + 2 * n.saturating_sub(1);
        if let Some(e) = self.elastic
            && total > WIDTH
            && e < n
        {
            let others = total - widths[e];
            widths[e] = WIDTH
                .saturating_sub(others)
                .max(self.headers[e].0.len())
                .max(8);
        }
        let header: Vec<String> = self.headers.iter().map(|(h, _)| h.to_string()).collect();
        std::iter::once(&header)
            .chain(&self.rows)
            .enumerate()
            .map(|(r, row)| {
                let mut plain = Vec::with_capacity(n);
                let mut painted = Vec::with_capacity(n);
                for (i, &width) in widths.iter().enumerate() {
                    let text = row.get(i).map_or("", String::as_str);
                    let cell = shorten(text, width);
                    let pad = " ".repeat(width.saturating_sub(cell.chars().count()));
                    let paint = if r == 0 {
                        Some(Paint::Bold)
                    } else {
                        self.painters
                            .iter()
                            .find(|(c, _)| *c == i)
                            .and_then(|(_, p)| p(text))
                    };
                    let shown = match paint {
                        Some(p) if colour && !cell.is_empty() => p.apply(&cell),
                        _ => cell.clone(),
                    };
                    match self.headers[i].1 {
                        Align::Left => {
                            plain.push(format!("{cell}{pad}"));
                            painted.push(format!("{shown}{pad}"));
                        }
                        Align::Right => {
                            plain.push(format!("{pad}{cell}"));
                            painted.push(format!("{pad}{shown}"));
                        }
                    }
                }
                let line = plain.join("  ");
                let line = line.trim_end();
                // Still too wide (only non-elastic columns are long): cut the end, visibly
                // (and plainly: a cut could fall inside an escape sequence).
                if line.chars().count() > WIDTH {
                    let kept: String = line.chars().take(WIDTH - 1).collect();
                    format!("{kept}…")
                } else if colour {
                    painted.join("  ").trim_end().to_string()
                } else {
                    line.to_string()
                }
            })
            .collect()
    }

    /// Prints the table on stdout, coloured only when stdout is a terminal.
    pub fn print(&self) {
        for line in self.render(colour_stdout()) {
            println!("{line}");
        }
    }
}

/// `text` cut from the left to `width` characters, marked with `…`.
pub fn shorten(text: &str, width: usize) -> String {
    let len = text.chars().count();
    if len <= width {
        return text.to_string();
    }
    let keep: String = text.chars().skip(len - width + 1).collect();
    format!("…{keep}")
}

/// Bytes for humans: `512B`, `4.0K`, `980.0M`, `1.5G` (powers of 1024).
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["K", "M", "G", "T", "P"];
    if n < 1024 {
        return format!("{n}B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1}{}", UNITS[unit])
}

/// An optional value for a table cell; `-` when absent.
pub fn or_dash<T: Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

/// `path` relative to the memory hierarchy's mount point when it is inside it (shorter
/// tables); unchanged otherwise.
pub fn short_cgroup(path: &str, memory_mount: Option<&Path>) -> String {
    match memory_mount.and_then(|m| Path::new(path).strip_prefix(m).ok()) {
        Some(rel) => format!("/{}", rel.display()),
        None => path.to_string(),
    }
}

/// Where the cgroup v1 memory hierarchy is mounted, from `/proc/self/mountinfo`.
pub fn memory_mount() -> Option<std::path::PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    memory_mounts(&text).into_iter().next()
}

pub use crate::cgroup::memory_mounts;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_fit() {
        let mut t = Table::new(&[("PATH", Align::Left), ("LIMIT", Align::Right)]).elastic(0);
        t.row(vec!["/a".into(), "1.0G".into()]);
        t.row(vec!["x".repeat(150), "256.0M".into()]);
        let lines = t.lines();
        assert!(lines[0].starts_with("PATH ") && lines[0].ends_with(" LIMIT"));
        assert!(
            lines.iter().all(|l| l.chars().count() <= WIDTH),
            "{lines:#?}"
        );
        assert!(lines[2].starts_with('…'));
        assert!(lines[1].ends_with("  1.0G"));
        assert_eq!(lines[1].chars().count(), lines[2].chars().count());

        let mut t = Table::new(&[("A", Align::Left), ("B", Align::Left)]);
        t.row(vec!["a".into(), "b".repeat(200)]);
        let lines = t.lines();
        assert_eq!(lines[1].chars().count(), WIDTH);
        assert!(lines[1].ends_with('…'));
    }

    #[test]
    fn coloured_tables_line_up_like_plain_ones() {
        let mut t = Table::new(&[("STATE", Align::Left), ("N", Align::Right)])
            .paint(0, |s| (s == "acting").then_some(Paint::Red));
        t.row(vec!["acting".into(), "1".into()]);
        t.row(vec!["armed".into(), "22".into()]);
        let plain = t.lines();
        assert!(plain.iter().all(|l| !l.contains('\x1b')), "{plain:?}");
        let coloured = t.render(true);
        assert_eq!(coloured[0], "\x1b[1mSTATE\x1b[0m    \x1b[1mN\x1b[0m");
        assert_eq!(coloured[1], "\x1b[31macting\x1b[0m   1");
        assert_eq!(coloured[2], plain[2], "unpainted cells stay plain");
        let strip = |l: &str| {
            let mut out = String::new();
            let mut esc = false;
            for c in l.chars() {
                match (esc, c) {
                    (false, '\x1b') => esc = true,
                    (true, 'm') => esc = false,
                    (false, c) => out.push(c),
                    _ => {}
                }
            }
            out
        };
        for (p, c) in plain.iter().zip(&coloured) {
            assert_eq!(&strip(c), p);
        }
    }

    #[test]
    fn sizes_for_humans() {
        assert_eq!(bytes(512), "512B");
        assert_eq!(bytes(4096), "4.0K");
        assert_eq!(bytes(980 << 20), "980.0M");
        assert_eq!(bytes(3 << 29), "1.5G");
    }

    #[test]
    fn cgroup_paths_shorten_to_the_hierarchy() {
        let m = Path::new("/sys/fs/cgroup/memory");
        assert_eq!(
            short_cgroup("/sys/fs/cgroup/memory/kubepods/x", Some(m)),
            "/kubepods/x"
        );
        assert_eq!(short_cgroup("/elsewhere", Some(m)), "/elsewhere");
        let mi = "30 25 0:26 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory\n\
                  32 25 0:28 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n";
        assert_eq!(memory_mounts(mi), [Path::new("/sys/fs/cgroup/memory")]);
    }
}
