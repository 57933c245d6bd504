//! Output for people and for scripts: aligned text tables, and JSON documents.

use std::fmt::Write;

/// A text table: a header row and left-aligned columns separated by two spaces.
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Table {
        Table {
            headers: headers.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; it must have one cell per header.
    pub fn row(&mut self, cells: Vec<String>) {
        assert_eq!(cells.len(), self.headers.len(), "table row width");
        self.rows.push(cells);
    }

    /// The table as text, one line per row, each ending in a newline.
    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&self.headers).chain(&self.rows) {
            let mut line = String::new();
            for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
                if i + 1 == row.len() {
                    line.push_str(cell);
                } else {
                    let _ = write!(line, "{cell:<w$}  ");
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Prints a JSON value, pretty, followed by a newline.
pub fn print_json(value: &serde_json::Value) {
    let mut text = serde_json::to_string_pretty(value).expect("a JSON value always serialises");
    text.push('\n');
    out(&text);
}

/// `println!` through [`out`].
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::admin::table::out(&format!("{}\n", format_args!($($arg)*)))
    };
}
pub(crate) use say;

/// Writes to stdout. A reader that went away (`spate topic list | head -1`) is not an error
/// worth a panic: the rest of the output is dropped.
pub fn out(text: &str) {
    use std::io::Write;
    let _ = std::io::stdout().write_all(text.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_to_the_widest_cell() {
        let mut t = Table::new(&["TOPIC", "PARTITIONS"]);
        t.row(vec!["a-long-topic".into(), "3".into()]);
        t.row(vec!["b".into(), "12".into()]);
        assert_eq!(
            t.render(),
            "TOPIC         PARTITIONS\na-long-topic  3\nb             12\n"
        );
    }
}
