//! SQL identifiers from configuration: validated, then quoted. A name that is not
//! a plain lower-case identifier is refused, never interpolated.

use std::fmt;

use brighter_core::Error;

/// A schema, table or other SQL name that passed validation: 1 to 63 bytes of
/// `a-z`, `0-9` and `_`, not starting with a digit.
///
/// ```
/// use brighter_postgres::Identifier;
///
/// assert_eq!(Identifier::new("brighter_outbox").unwrap().quoted(), "\"brighter_outbox\"");
/// assert!(Identifier::new("outbox; DROP TABLE users").is_err());
/// assert!(Identifier::new("Outbox").is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identifier(String);

impl Identifier {
    /// The longest identifier Postgres keeps without truncating.
    pub const MAX_LEN: usize = 63;

    /// Validates `name`; fails with [`Error::Configuration`] naming the problem.
    pub fn new(name: &str) -> Result<Self, Error> {
        Self::with_max_len(name, Self::MAX_LEN)
    }

    /// Validates `name` with a lower length bound, for names that get suffixes.
    pub fn with_max_len(name: &str, max_len: usize) -> Result<Self, Error> {
        let refuse = |why: &str| {
            Err(Error::configuration(format!(
                "{name:?} is not accepted as an SQL identifier: {why}"
            )))
        };
        if name.is_empty() {
            return refuse("it is empty");
        }
        if name.len() > max_len {
            return refuse(&format!("it is longer than {max_len} bytes"));
        }
        if name.starts_with(|c: char| c.is_ascii_digit()) {
            return refuse("it starts with a digit");
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return refuse("only lower-case letters, digits and '_' are allowed");
        }
        Ok(Identifier(name.to_owned()))
    }

    /// The name as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name in double quotes, for SQL text.
    pub fn quoted(&self) -> String {
        format!("\"{}\"", self.0)
    }

    /// A derived identifier: this name with `suffix`, validated again.
    pub fn suffixed(&self, suffix: &str) -> Result<Identifier, Error> {
        Identifier::new(&format!("{}{suffix}", self.0))
    }
}

impl fmt::Display for Identifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Fills `{name}` placeholders of an SQL template with quoted identifiers and
/// `{channel}`-like raw values (which must come from identifiers too).
pub fn render(template: &str, names: &[(&str, String)]) -> String {
    names.iter().fold(template.to_owned(), |sql, (key, value)| {
        sql.replace(&format!("{{{key}}}"), value)
    })
}
