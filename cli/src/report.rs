//! What a command prints: tables and lines for people, the same facts as
//! JSON for scripts. Nothing printed carries a credential.

use brighter::MessageHeader;
use chrono::{DateTime, Utc};
use comfy_table::{Table, presets};
use serde_json::Value;

/// A command's result.
#[derive(Debug, Default)]
pub(crate) struct Report {
    /// Lines before the tables.
    pub(crate) lines: Vec<String>,
    /// Tables, each with a title.
    pub(crate) tables: Vec<(String, Table)>,
    /// Lines after the tables.
    pub(crate) after: Vec<String>,
    /// The result for `--json`.
    pub(crate) json: Value,
}

impl Report {
    /// A report of `json`, with `line` for people.
    pub(crate) fn line(line: impl Into<String>, json: Value) -> Report {
        Report {
            lines: vec![line.into()],
            tables: Vec::new(),
            after: Vec::new(),
            json,
        }
    }

    /// Adds a table titled `title` with `header` and `rows`.
    pub(crate) fn table(mut self, title: &str, header: &[&str], rows: Vec<Vec<String>>) -> Self {
        let mut table = Table::new();
        table.load_style(presets::ASCII_MARKDOWN);
        table.set_header(header.iter().copied());
        for row in rows {
            table.add_row(row);
        }
        self.tables.push((title.to_owned(), table));
        self
    }

    /// Prints it: JSON, or lines and tables.
    pub(crate) fn print(&self, json: bool) {
        if json {
            println!(
                "{}",
                serde_json::to_string_pretty(&self.json).unwrap_or_default()
            );
            return;
        }
        for line in &self.lines {
            println!("{line}");
        }
        for (title, table) in &self.tables {
            if !title.is_empty() {
                println!();
                println!("{title}");
            }
            println!("{table}");
        }
        for line in &self.after {
            println!("{line}");
        }
    }
}

/// `text` with anything shaped like URI credentials (`scheme://user:password@`)
/// cut to `scheme://user:***@`: errors from a client may quote an address.
pub(crate) fn redacted(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (before, after) = rest.split_at(at + 3);
        out.push_str(before);
        let end = after
            .find(|c: char| c.is_whitespace() || c == '\'' || c == '"')
            .unwrap_or(after.len());
        let (authority, tail) = after.split_at(end);
        match authority.split_once('@') {
            Some((userinfo, host)) if !userinfo.contains('/') => {
                let user = userinfo.split(':').next().unwrap_or_default();
                if userinfo.contains(':') {
                    out.push_str(&format!("{user}:***@{host}"));
                } else {
                    out.push_str(&format!("{user}@{host}"));
                }
            }
            _ => out.push_str(authority),
        }
        rest = tail;
    }
    out.push_str(rest);
    out
}

/// A time for a table: RFC 3339 to the second, in UTC.
pub(crate) fn time(at: Option<DateTime<Utc>>) -> String {
    at.map_or_else(String::new, |t| t.format("%Y-%m-%d %H:%M:%S").to_string())
}

/// How long ago `at` was, for a table: `3s`, `4m 10s`, `2h 5m`, `3d 4h`.
pub(crate) fn age(at: DateTime<Utc>) -> String {
    let secs = (Utc::now() - at).num_seconds().max(0);
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

/// A message's CloudEvents type as a table cell: empty when it has none.
pub(crate) fn event_type(header: &MessageHeader) -> String {
    header
        .cloud_events
        .kind
        .as_deref()
        .unwrap_or_default()
        .to_owned()
}

/// `text` cut to `max` characters, with an ellipsis.
pub(crate) fn short(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let cut: String = text.chars().take(max.saturating_sub(1)).collect();
    format!("{cut}…")
}

#[cfg(test)]
mod tests {
    use super::redacted;

    #[test]
    fn credentials_in_an_error_are_cut() {
        assert_eq!(
            redacted("connect to amqp://app:s3cret@rabbit:5672/%2f failed"),
            "connect to amqp://app:***@rabbit:5672/%2f failed"
        );
        assert_eq!(
            redacted("postgres://u:p@db/x and http://example.com/a@b"),
            "postgres://u:***@db/x and http://example.com/a@b"
        );
        assert_eq!(redacted("no address here"), "no address here");
    }
}
