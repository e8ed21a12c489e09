//! SQL text as spans show it: literals replaced by `?`, and the operation and table a statement
//! names (`db.operation.name`, `db.collection.name`), for the SQL protocols.
//!
//! This is a scanner, not a parser: it knows strings, quoted identifiers, comments and numbers,
//! which is what sanitising needs; the operation is the first keyword, the collection the name
//! after `FROM`, `INTO`, `UPDATE`, `TABLE` or `JOIN`'s first occurrence.

use crate::spans::Value;

/// Longest `db.query.text` kept, in bytes (cut at a character boundary, `...` appended).
pub const MAX_TEXT: usize = 1024;

/// `text` with every literal (strings, numbers, `E'...'`, dollar-quoted strings) replaced by
/// `?`, runs of whitespace made one space, cut to [`MAX_TEXT`]. Placeholders (`$1`, `?`) and
/// identifiers stay. An unterminated string hides the rest of the text.
pub fn sanitize(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len().min(MAX_TEXT));
    let mut i = 0;
    let mut last_space = true;
    while i < b.len() && out.len() < MAX_TEXT {
        let c = b[i];
        match c {
            b'\'' => {
                i = skip_quoted(b, i, b'\'');
                out.push('?');
                last_space = false;
                continue;
            }
            b'E' | b'e' | b'X' | b'x' | b'B' | b'b' | b'N' | b'n'
                if b.get(i + 1) == Some(&b'\'') && !ident_before(b, i) =>
            {
                i = skip_quoted(b, i + 1, b'\'');
                out.push('?');
                last_space = false;
                continue;
            }
            b'"' | b'`' => {
                // A quoted identifier: kept.
                let end = skip_quoted(b, i, c);
                out.push_str(&text[i..end]);
                i = end;
                last_space = false;
                continue;
            }
            b'$' => {
                if let Some(end) = dollar_quoted(b, i) {
                    out.push('?');
                    i = end;
                    last_space = false;
                    continue;
                }
                // `$1`: a placeholder.
                let end = i + 1 + b[i + 1..].iter().take_while(|d| d.is_ascii_digit()).count();
                out.push_str(&text[i..end]);
                i = end;
                last_space = false;
                continue;
            }
            b'-' if b.get(i + 1) == Some(&b'-') => {
                i += b[i..]
                    .iter()
                    .position(|&c| c == b'\n')
                    .unwrap_or(b.len() - i);
                continue;
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i = b[i + 2..]
                    .windows(2)
                    .position(|w| w == b"*/")
                    .map_or(b.len(), |p| i + 2 + p + 2);
                continue;
            }
            b'0'..=b'9' if !ident_before(b, i) => {
                let mut end = i;
                while end < b.len()
                    && (b[end].is_ascii_alphanumeric() || b[end] == b'.' || b[end] == b'_')
                {
                    end += 1;
                }
                out.push('?');
                i = end;
                last_space = false;
                continue;
            }
            c if c.is_ascii_whitespace() => {
                if !last_space {
                    out.push(' ');
                    last_space = true;
                }
            }
            _ => {
                let len = utf8_len(c);
                let end = (i + len).min(b.len());
                if let Some(s) = text.get(i..end) {
                    out.push_str(s);
                }
                i = end;
                last_space = false;
                continue;
            }
        }
        i += 1;
    }
    let trimmed = out.trim_end().len();
    out.truncate(trimmed);
    if out.len() >= MAX_TEXT {
        let mut cut = MAX_TEXT;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push_str("...");
    }
    out
}

/// The byte after the quoted run that starts at `i` (the quote doubled inside is an escape,
/// and so is a backslash before it).
fn skip_quoted(b: &[u8], i: usize, quote: u8) -> usize {
    let mut j = i + 1;
    while j < b.len() {
        if b[j] == b'\\' && quote == b'\'' {
            j += 2;
            continue;
        }
        if b[j] == quote {
            if b.get(j + 1) == Some(&quote) {
                j += 2;
                continue;
            }
            return j + 1;
        }
        j += 1;
    }
    b.len()
}

/// `$tag$ ... $tag$` starting at `i`: the byte after it.
fn dollar_quoted(b: &[u8], i: usize) -> Option<usize> {
    let tag_len = b[i + 1..]
        .iter()
        .take_while(|c| c.is_ascii_alphanumeric() || **c == b'_')
        .count();
    let close = i + 1 + tag_len;
    if b.get(close) != Some(&b'$') || b.get(i + 1).is_some_and(u8::is_ascii_digit) {
        return None;
    }
    let tag = &b[i..=close];
    let body = close + 1;
    Some(
        b[body..]
            .windows(tag.len())
            .position(|w| w == tag)
            .map_or(b.len(), |p| body + p + tag.len()),
    )
}

/// The byte before `i` continues an identifier (`t1`, `x'`...): what follows is not a literal.
fn ident_before(b: &[u8], i: usize) -> bool {
    i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_' || b[i - 1] == b'$')
}

fn utf8_len(first: u8) -> usize {
    match first {
        0xF0..=0xFF => 4,
        0xE0..=0xEF => 3,
        0xC0..=0xDF => 2,
        _ => 1,
    }
}

/// The statement's operation (its first keyword, upper case) and the table it names, if any.
pub fn operation_and_collection(sanitized: &str) -> (Option<String>, Option<String>) {
    let mut words = sanitized
        .split(|c: char| c.is_whitespace() || c == '(' || c == ')' || c == ',' || c == ';')
        .filter(|w| !w.is_empty());
    let Some(first) = words.next() else {
        return (None, None);
    };
    if !first.bytes().all(|b| b.is_ascii_alphabetic()) {
        return (None, None);
    }
    let operation = first.to_ascii_uppercase();
    let marker: &[&str] = match operation.as_str() {
        "SELECT" | "DELETE" => &["FROM"],
        "INSERT" | "REPLACE" => &["INTO"],
        "UPDATE" => &["UPDATE"],
        "CREATE" | "DROP" | "ALTER" | "TRUNCATE" => &["TABLE", "INDEX", "VIEW", "TRUNCATE"],
        "COPY" => &["COPY"],
        _ => &[],
    };
    let mut collection = None;
    if !marker.is_empty() {
        let all: Vec<&str> = std::iter::once(first).chain(words).collect();
        for (k, w) in all.iter().enumerate() {
            if marker.iter().any(|m| w.eq_ignore_ascii_case(m)) {
                let mut rest = all[k + 1..].iter().copied().filter(|w| {
                    !["IF", "NOT", "EXISTS", "ONLY", "TABLE"]
                        .iter()
                        .any(|kw| w.eq_ignore_ascii_case(kw))
                });
                if let Some(name) = rest.next() {
                    if name != "?" && !name.starts_with('$') && !name.eq_ignore_ascii_case("select")
                    {
                        collection = Some(name.trim_matches('"').trim_matches('`').to_owned());
                    }
                }
                break;
            }
        }
    }
    (Some(operation), collection)
}

/// A SQL span's name: `{operation} {table}`, the operation alone, or `fallback`.
pub fn span_name_into(
    out: &mut String,
    operation: Option<&str>,
    collection: Option<&str>,
    fallback: &str,
) {
    match (operation, collection) {
        (Some(op), Some(table)) => {
            out.push_str(op);
            out.push(' ');
            out.push_str(table);
        }
        (Some(op), None) => out.push_str(op),
        _ => out.push_str(fallback),
    }
}

/// What a SQL span says of its statement, per the database conventions: the operation, the
/// table, the database (`db.namespace`) and the sanitised text, each when known.
pub fn statement_attributes(
    operation: Option<&str>,
    collection: Option<&str>,
    database: &str,
    text: Option<&str>,
    mut f: impl FnMut(&str, Value<'_>),
) {
    if let Some(op) = operation {
        f("db.operation.name", Value::Str(op));
    }
    if let Some(table) = collection {
        f("db.collection.name", Value::Str(table));
    }
    if !database.is_empty() {
        f("db.namespace", Value::Str(database));
    }
    if let Some(text) = text {
        f("db.query.text", Value::Str(text));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_become_placeholders() {
        assert_eq!(
            sanitize("SELECT * FROM users WHERE name = 'O''Brien' AND id = 42 AND t1.x > 3.5e2"),
            "SELECT * FROM users WHERE name = ? AND id = ? AND t1.x > ?"
        );
        assert_eq!(
            sanitize("INSERT INTO t (a, b) VALUES ($1, E'secret\\'s'), (-7, x'ff')"),
            "INSERT INTO t (a, b) VALUES ($1, ?), (-?, ?)"
        );
        assert_eq!(
            sanitize("SELECT $tag$ hunter2 $tag$, $$ also $$ -- comment 'x'\n FROM \"Table\""),
            "SELECT ?, ? FROM \"Table\""
        );
        assert_eq!(
            sanitize("UPDATE t SET a = 'unterminated"),
            "UPDATE t SET a = ?"
        );
        assert_eq!(sanitize("SELECT /* 'x' */ 1"), "SELECT ?");
        assert_eq!(sanitize("SELECT  é,\n\t1"), "SELECT é, ?");
        let long = format!("SELECT {}", "a, ".repeat(1000));
        assert!(sanitize(&long).len() <= MAX_TEXT + 3);
    }

    #[test]
    fn operation_and_table() {
        let cases = [
            (
                "SELECT a FROM public.users WHERE x = ?",
                "SELECT",
                Some("public.users"),
            ),
            ("select count(*) from (select 1) s", "SELECT", None),
            (
                "INSERT INTO orders (a) VALUES (?)",
                "INSERT",
                Some("orders"),
            ),
            ("UPDATE \"Stock\" SET n = ?", "UPDATE", Some("Stock")),
            ("DELETE FROM t", "DELETE", Some("t")),
            (
                "CREATE TABLE IF NOT EXISTS items (id int)",
                "CREATE",
                Some("items"),
            ),
            ("BEGIN", "BEGIN", None),
        ];
        for (sql, op, table) in cases {
            assert_eq!(
                operation_and_collection(sql),
                (Some(op.to_owned()), table.map(str::to_owned)),
                "{sql}"
            );
        }
        assert_eq!(operation_and_collection(""), (None, None));
    }
}
