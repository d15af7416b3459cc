//! Errors printed once, on one line.
//!
//! anyhow prints an error and then its causes under "Caused by", and many errors already include their
//! cause in their own text (`reading FILE: No such file`), so the operator reads everything twice.
//! [`one_line`] joins the chain with `: ` and leaves out a cause whose text is already there.

use std::process::ExitCode;

/// The error and its causes on one line, each cause once.
pub fn one_line(error: &(dyn std::error::Error + 'static)) -> String {
    let mut line = flatten(&error.to_string());
    let mut cause = error.source();
    while let Some(next) = cause {
        let text = flatten(&next.to_string());
        if !text.is_empty() && !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = next.source();
    }
    line
}

/// [`one_line`] for an `anyhow::Error` (its context layers are causes too).
pub fn one_line_anyhow(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for next in error.chain() {
        let text = flatten(&next.to_string());
        if text.is_empty() || line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// Multi-line messages (TOML's, with a caret under the offending text) become one line.
fn flatten(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Prints `error` once, as the binary's last word: through the JSON log when `--log-format json` is on
/// (log shippers see it), else as `PROGRAM: error: …` on stderr.
pub fn print(program: &str, error: &anyhow::Error) {
    let line = one_line_anyhow(error);
    match crate::logging::format() {
        Some(crate::LogFormat::Json) => tracing::error!(error = %line, "{program} stopped"),
        _ => eprintln!("{program}: error: {line}"),
    }
}

/// The exit status of a binary's `main`: success, or the error printed once and failure.
pub fn exit(program: &str, result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            print(program, &error);
            ExitCode::FAILURE
        }
    }
}

/// A TOML error on one line: `line L, column C: MESSAGE (key KEY)`. The key is the dotted path of the
/// table and key at the error (`listener[1].address`), found from the error's position in `text`.
pub fn toml_error(text: &str, error: &toml::de::Error) -> String {
    let message = flatten(error.message());
    let Some(span) = error.span() else {
        return message;
    };
    let start = span.start.min(text.len());
    let before = &text[..start];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    match key_at(text, start) {
        Some(key) => format!("line {line}, column {column}: {key}: {message}"),
        None => format!("line {line}, column {column}: {message}"),
    }
}

/// The dotted key at byte `offset` of a TOML document: the last table header above it plus the key on
/// its line (`[[array]]` tables get their index). Good for the one-key-a-line files operators write.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let mut table = String::new();
    let mut arrays: Vec<(String, usize)> = Vec::new();
    let mut position = 0;
    for line in text.split_inclusive('\n') {
        let end = position + line.len();
        let trimmed = line.trim();
        if let Some(name) = trimmed
            .strip_prefix("[[")
            .and_then(|rest| rest.split("]]").next())
        {
            let name = name.trim().to_owned();
            let index = match arrays.iter_mut().find(|(n, _)| *n == name) {
                Some((_, count)) => {
                    *count += 1;
                    *count - 1
                }
                None => {
                    arrays.push((name.clone(), 1));
                    0
                }
            };
            table = format!("{name}[{index}]");
        } else if let Some(name) = trimmed
            .strip_prefix('[')
            .and_then(|rest| rest.split(']').next())
        {
            table = name.trim().to_owned();
        }
        if offset < end || end == text.len() {
            let key = trimmed
                .split_once('=')
                .map(|(key, _)| key.trim().trim_matches('"').to_owned())
                .filter(|k| !k.is_empty() && !k.starts_with('['));
            return match (table.is_empty(), key) {
                (_, None) if table.is_empty() => None,
                (_, None) => Some(table),
                (true, Some(key)) => Some(key),
                (false, Some(key)) => Some(format!("{table}.{key}")),
            };
        }
        position = end;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Outer(Inner);
    #[derive(Debug)]
    struct Inner;
    impl std::fmt::Display for Outer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "reading a.toml: {}", self.0)
        }
    }
    impl std::fmt::Display for Inner {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "No such file or directory")
        }
    }
    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }
    impl std::error::Error for Inner {}

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        assert_eq!(
            one_line(&Outer(Inner)),
            "reading a.toml: No such file or directory"
        );
        let error = anyhow::Error::new(Outer(Inner)).context("starting");
        assert_eq!(
            one_line_anyhow(&error),
            "starting: reading a.toml: No such file or directory"
        );
    }

    #[test]
    fn toml_errors_are_one_line_with_the_key() {
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Limits {
            max_connections: usize,
        }
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Listener {
            address: String,
        }
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Doc {
            limits: Option<Limits>,
            listener: Option<Vec<Listener>>,
        }
        let text = "# comment\n[limits]\nmax_connections = \"x\"\n";
        let error = toml::from_str::<Doc>(text).expect_err("bad type");
        let line = toml_error(text, &error);
        assert_eq!(
            line,
            "line 3, column 19: limits.max_connections: invalid type: string \"x\", expected usize"
        );
        assert!(!line.contains('\n'));

        let text = "[[listener]]\naddress = \"a\"\n[[listener]]\naddres = \"b\"\n";
        let error = toml::from_str::<Doc>(text).expect_err("unknown key");
        let line = toml_error(text, &error);
        assert!(
            line.starts_with("line 4, column 1: listener[1].addres: unknown field `addres`"),
            "{line}"
        );
    }
}
