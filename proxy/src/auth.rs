//! Basic proxy authentication (RFC 7617 with `Proxy-Authorization`, RFC 7235).

use std::collections::HashMap;
use std::path::Path;

use base64::Engine;

/// Errors loading a credentials file.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The file could not be read.
    #[error("reading credentials file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A line is not `user:password`.
    #[error("credentials file {path}, line {line}: expected user:password")]
    Malformed {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
    },
}

/// Users and their passwords.
#[derive(Debug, Clone)]
pub struct Credentials {
    users: HashMap<String, String>,
    realm: String,
}

impl Credentials {
    /// Parses `user:password` lines; blank lines and `#` comments are skipped.
    pub fn parse(text: &str, path: &str, realm: &str) -> Result<Self, AuthError> {
        let mut users = HashMap::new();
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match line.split_once(':') {
                Some((user, password)) if !user.is_empty() => {
                    users.insert(user.to_owned(), password.to_owned());
                }
                _ => {
                    return Err(AuthError::Malformed {
                        path: path.to_owned(),
                        line: index + 1,
                    })
                }
            }
        }
        Ok(Self {
            users,
            realm: realm.to_owned(),
        })
    }

    /// Reads a credentials file.
    pub fn load(path: &Path, realm: &str) -> Result<Self, AuthError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&text, &shown, realm)
    }

    /// The `Proxy-Authenticate` challenge.
    pub fn challenge(&self) -> String {
        format!("Basic realm=\"{}\"", self.realm.replace('"', "'"))
    }

    /// Checks a `Proxy-Authorization` header value; returns the user name when it is valid.
    pub fn verify(&self, header: Option<&[u8]>) -> Option<String> {
        let header = std::str::from_utf8(header?).ok()?.trim();
        let (scheme, encoded) = header.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .ok()?;
        let decoded = String::from_utf8(decoded).ok()?;
        let (user, password) = decoded.split_once(':')?;
        let expected = self.users.get(user)?;
        constant_time_eq(expected.as_bytes(), password.as_bytes()).then(|| user.to_owned())
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(user_password: &str) -> Vec<u8> {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(user_password)
        )
        .into_bytes()
    }

    #[test]
    fn verifies_users() {
        let creds = Credentials::parse("# users\nalice:s3cret\n\nbob:pa:ss\n", "f", "r")
            .expect("valid file");
        assert_eq!(
            creds.verify(Some(&basic("alice:s3cret"))),
            Some("alice".into())
        );
        assert_eq!(creds.verify(Some(&basic("bob:pa:ss"))), Some("bob".into()));
        assert_eq!(creds.verify(Some(&basic("alice:wrong"))), None);
        assert_eq!(creds.verify(Some(&basic("carol:s3cret"))), None);
        assert_eq!(creds.verify(Some(b"Bearer abc")), None);
        assert_eq!(creds.verify(Some(b"Basic !!!")), None);
        assert_eq!(creds.verify(None), None);
        assert_eq!(creds.challenge(), "Basic realm=\"r\"");
    }

    #[test]
    fn malformed_line_is_named() {
        let err = Credentials::parse("alice:x\nnocolon\n", "creds.txt", "r").unwrap_err();
        assert_eq!(
            err.to_string(),
            "credentials file creds.txt, line 2: expected user:password"
        );
    }
}
