//! Markdown tables for the report: a header, rows of cells, rendered with the separator
//! line, so each section states its columns once.

use std::fmt;

/// A markdown table; an empty one renders as nothing.
pub(crate) struct Table {
    /// Text before the table (a caption), printed with a blank line after it.
    caption: Option<String>,
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub(crate) fn new(header: &[&str]) -> Self {
        Table {
            caption: None,
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub(crate) fn caption(mut self, text: &str) -> Self {
        self.caption = Some(text.to_string());
        self
    }

    /// Appends a row; it must have as many cells as the header.
    pub(crate) fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.header.len(), "{:?}", self.header);
        self.rows.push(cells);
    }
}

/// `cells![a, b, c]`: each argument formatted with `Display`.
macro_rules! cells {
    ($($x:expr),* $(,)?) => { vec![$($x.to_string()),*] };
}
pub(crate) use cells;

impl fmt::Display for Table {
    /// Nothing when there are no rows; else a blank line, the caption, the table.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.rows.is_empty() {
            return Ok(());
        }
        writeln!(f)?;
        if let Some(c) = &self.caption {
            writeln!(f, "{c}\n")?;
        }
        let line = |cells: &[String]| format!("| {} |", cells.join(" | "));
        writeln!(f, "{}", line(&self.header))?;
        writeln!(f, "|{}", "---|".repeat(self.header.len()))?;
        for r in &self.rows {
            writeln!(f, "{}", line(r))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_header_separator_and_rows() {
        let mut t = Table::new(&["a", "b"]).caption("cap");
        t.row(cells![1, "x"]);
        assert_eq!(t.to_string(), "\ncap\n\n| a | b |\n|---|---|\n| 1 | x |\n");
    }

    #[test]
    fn an_empty_table_is_nothing() {
        assert_eq!(Table::new(&["a"]).to_string(), "");
    }
}
