//! The `oomguard` command line ([`args`], one clap tree) and the debug subcommands, one
//! module each, and what they share: aligned tables cut to the terminal's width (coloured
//! only on a terminal; never cut when stdout is not one), sizes for humans, JSON output, and
//! one clear line plus a non-zero exit status when something is missing (with `--json`, that
//! line is `{"error": "..."}` on stdout).
//!
//! `--json` output is stable: fields are only ever added. README.md, "Debug CLI", documents it.

pub mod args;
pub mod bpf;
pub mod cgroups;
pub mod doctor;
pub mod events;

use std::fmt::Display;
use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;

/// `error` and its sources on one line.
pub use crate::error_line;

/// Reports `error` and its sources as one line; exit status 1. With `json`, the line is
/// `{"error": "..."}` on stdout (as bpftool does), else plain text on stderr.
pub fn fail(error: &dyn std::error::Error, json: bool) -> ExitCode {
    let line = error_line(error);
    if json {
        println!("{}", serde_json::json!({ "error": line }));
    } else {
        eprintln!("oomguard: {line}");
    }
    ExitCode::FAILURE
}

/// Prints `value` as pretty JSON on stdout.
pub fn print_json(value: &impl serde::Serialize) -> ExitCode {
    match serde_json::to_string_pretty(value) {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e, true),
    }
}

/// How many columns human output may take: on a terminal, `COLUMNS` when it is set, else
/// the terminal's width; `None` (never cut) when stdout is a file or a pipe, so nothing a
/// script or a pager reads is lost.
pub fn stdout_width() -> Option<usize> {
    let stdout = std::io::stdout();
    if !stdout.is_terminal() {
        return None;
    }
    let columns = std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.trim().parse().ok());
    let queried = || {
        rustix::termios::tcgetwinsize(&stdout)
            .ok()
            .map(|w| usize::from(w.ws_col))
    };
    // A terminal that does not know its size (a serial console says 0) gets the classic 80.
    Some(columns.or_else(queried).filter(|&c| c > 0).unwrap_or(80))
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

/// Columns between two cells.
const GAP: usize = 2;

/// A table of text cells with aligned columns: the one renderer of every debug view.
/// Given a width, the widest columns give way first, cut at the end (`abc…`), never below
/// their header's width; columns marked [`Table::whole`] are never cut. Coloured, the header
/// is bold and painted columns take their cell's paint; widths and cuts are those of the
/// plain text, so both renderings line up the same.
#[derive(Clone)]
pub struct Table {
    headers: Vec<(&'static str, Align)>,
    rows: Vec<Vec<String>>,
    whole: Vec<usize>,
    min_widths: Vec<usize>,
    painters: Vec<(usize, Painter)>,
}

impl Table {
    pub fn new(headers: &[(&'static str, Align)]) -> Table {
        Table {
            headers: headers.to_vec(),
            rows: Vec::new(),
            whole: Vec::new(),
            min_widths: headers.iter().map(|(h, _)| h.chars().count()).collect(),
            painters: Vec::new(),
        }
    }

    /// Column `index` is painted by `painter` when the table is coloured.
    pub fn paint(mut self, index: usize, painter: Painter) -> Table {
        self.painters.push((index, painter));
        self
    }

    /// Column `index` is never cut (a time, an event name).
    pub fn whole(mut self, index: usize) -> Table {
        self.whole.push(index);
        self
    }

    /// Columns at least this wide, whatever the rows hold: rows rendered one at a time (a
    /// stream) then line up while their cells fit.
    pub fn min_widths(mut self, widths: &[usize]) -> Table {
        for (min, &w) in self.min_widths.iter_mut().zip(widths) {
            *min = (*min).max(w);
        }
        self
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The rendered lines, header first, within `width` columns (`None`: uncut); no trailing
    /// spaces; no colour.
    pub fn lines(&self, width: Option<usize>) -> Vec<String> {
        self.render(width, false)
    }

    /// The rendered lines, with ANSI colour when `colour`.
    pub fn render(&self, width: Option<usize>, colour: bool) -> Vec<String> {
        let n = self.headers.len();
        let mut natural = self.min_widths.clone();
        for row in &self.rows {
            for (w, cell) in natural.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let widths = match width {
            Some(max) => {
                let floors: Vec<usize> = self.headers.iter().map(|(h, _)| h.len()).collect();
                let whole: Vec<bool> = (0..n).map(|i| self.whole.contains(&i)).collect();
                fit(&natural, &floors, &whole, max)
            }
            None => natural,
        };
        let header: Vec<String> = self.headers.iter().map(|(h, _)| h.to_string()).collect();
        std::iter::once(&header)
            .chain(&self.rows)
            .enumerate()
            .map(|(r, row)| {
                let mut plain = Vec::with_capacity(n);
                let mut painted = Vec::with_capacity(n);
                for (i, &w) in widths.iter().enumerate() {
                    let text = row.get(i).map_or("", String::as_str);
                    let cell = cut_end(text, w);
                    let pad = " ".repeat(w.saturating_sub(cell.chars().count()));
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
                let gap = " ".repeat(GAP);
                let line = plain.join(&gap);
                let line = line.trim_end();
                match width {
                    // Whole columns alone are too wide for this terminal: cut the line's
                    // end, plainly (a cut could fall inside an escape sequence).
                    Some(max) if line.chars().count() > max => cut_end(line, max),
                    _ if colour => painted.join(&gap).trim_end().to_string(),
                    _ => line.to_string(),
                }
            })
            .collect()
    }

    /// Prints the table on stdout: cut to the terminal's width and coloured only when stdout
    /// is a terminal.
    pub fn print(&self) {
        for line in self.render(stdout_width(), colour_stdout()) {
            println!("{line}");
        }
    }
}

/// Column widths within `max` columns (with [`GAP`] between columns): `natural` when they
/// fit; else the widest column that may be cut (not `whole`, above its `floor`; the last
/// of equals) gives one column at a time until the line fits or no column can give.
pub fn fit(natural: &[usize], floors: &[usize], whole: &[bool], max: usize) -> Vec<usize> {
    let mut widths = natural.to_vec();
    let gaps = GAP * widths.len().saturating_sub(1);
    let mut total = widths.iter().sum::<usize>() + gaps;
    while total > max {
        let widest = (0..widths.len())
            .filter(|&i| !whole.get(i).copied().unwrap_or(false))
            .filter(|&i| widths[i] > floors.get(i).copied().unwrap_or(0))
            .max_by_key(|&i| (widths[i], i));
        let Some(i) = widest else { break };
        widths[i] -= 1;
        total -= 1;
    }
    widths
}

/// `text` cut at the end to `width` characters, the cut marked with `…`.
pub fn cut_end(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_string();
    }
    if width == 0 {
        return String::new();
    }
    let kept: String = text.chars().take(width - 1).collect();
    format!("{kept}…")
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

    fn events_table() -> Table {
        let mut t = Table::new(&[
            ("TIME", Align::Left),
            ("EVENT", Align::Left),
            ("CGROUP", Align::Left),
            ("USAGE", Align::Right),
            ("DETAIL", Align::Left),
        ])
        .whole(0)
        .whole(1);
        t.row(vec![
            "12:34:56".into(),
            "kill".into(),
            format!("/kubepods/burstable/pod{}", "a".repeat(40)),
            "1.0G".into(),
            format!("42 memhog (process) {}", "detail ".repeat(20)),
        ]);
        t.row(vec![
            "12:34:57".into(),
            "kernel-oom".into(),
            "/short".into(),
            "-".into(),
            "-".into(),
        ]);
        t
    }

    #[test]
    fn cells_are_cut_at_the_end_to_fit_the_width() {
        let lines = events_table().lines(Some(80));
        assert!(lines.iter().all(|l| l.chars().count() <= 80), "{lines:#?}");
        assert!(
            lines[0].starts_with("TIME      EVENT       CGROUP"),
            "{lines:#?}"
        );
        // TIME and EVENT stay whole; the long cells keep their beginnings.
        assert!(lines[1].starts_with("12:34:56  kill        /kubepods/burstable/pod"));
        assert!(lines[1].ends_with('…'), "{lines:#?}");
        assert!(lines[1].contains("  1.0G  42 memhog"), "{lines:#?}");
        assert!(lines[2].starts_with("12:34:57  kernel-oom  /short "));
        // Columns still line up: USAGE ends at the same place on every row.
        let end = |l: &str, cell: &str| l.find(cell).map(|i| l[..i].chars().count() + cell.len());
        assert_eq!(end(&lines[0], "USAGE"), end(&lines[1], "1.0G"));
    }

    #[test]
    fn without_a_width_nothing_is_cut() {
        let t = events_table();
        let lines = t.lines(None);
        assert!(lines.iter().all(|l| !l.contains('…')), "{lines:#?}");
        assert!(lines[1].ends_with(&"detail ".repeat(20).trim_end().to_string()));
        assert!(lines[1].chars().count() > 150);
    }

    #[test]
    fn whole_columns_survive_a_narrow_terminal() {
        let lines = events_table().lines(Some(30));
        assert!(lines.iter().all(|l| l.chars().count() <= 30), "{lines:#?}");
        assert!(lines[1].starts_with("12:34:56  kill "), "{lines:#?}");
        assert!(lines[2].starts_with("12:34:57  kernel-oom "), "{lines:#?}");
        // No column goes below its header.
        assert!(
            lines[0].starts_with("TIME      EVENT       CGROUP"),
            "{lines:#?}"
        );
    }

    #[test]
    fn fit_takes_from_the_widest_first() {
        // 10 + 40 + 30 + 2 gaps = 84 > 60: the 40 gives until it meets the 30, then both.
        assert_eq!(
            fit(&[10, 40, 30], &[4, 4, 4], &[false; 3], 60),
            [10, 23, 23]
        );
        assert_eq!(
            fit(&[10, 40, 30], &[4, 4, 4], &[false; 3], 84),
            [10, 40, 30]
        );
        assert_eq!(
            fit(&[10, 40], &[4, 4], &[false, true], 30),
            [4, 40],
            "whole"
        );
        assert_eq!(cut_end("abcdef", 4), "abc…");
        assert_eq!(cut_end("abc", 4), "abc");
        assert_eq!(cut_end("abc", 0), "");
    }

    #[test]
    fn rows_streamed_one_at_a_time_line_up() {
        let template = Table::new(&[("TIME", Align::Left), ("EVENT", Align::Left)])
            .whole(0)
            .min_widths(&[8, 12]);
        let line = |cells: [&str; 2]| {
            let mut t = template.clone();
            t.row(cells.iter().map(|c| c.to_string()).collect());
            t.lines(Some(80)).remove(1)
        };
        assert_eq!(template.lines(Some(80))[0], "TIME      EVENT");
        assert_eq!(line(["12:00:00", "kill"]), "12:00:00  kill");
        assert_eq!(line(["12:00:01", "no-candidate"]), "12:00:01  no-candidate");
    }

    #[test]
    fn coloured_tables_line_up_like_plain_ones() {
        let mut t = Table::new(&[("STATE", Align::Left), ("N", Align::Right)])
            .paint(0, |s| (s == "acting").then_some(Paint::Red));
        t.row(vec!["acting".into(), "1".into()]);
        t.row(vec!["armed".into(), "22".into()]);
        let plain = t.lines(None);
        assert!(plain.iter().all(|l| !l.contains('\x1b')), "{plain:?}");
        let coloured = t.render(None, true);
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
