//! The API keys file: one key a line, optionally followed by `setting=value` words; `#` starts
//! a comment (at the start of a line or of a word). See docs/security.md.
//!
//! ```text
//! # a bare key may do anything
//! 3f9c2a7d1e6b4c8a9d0e2f4b6a8c0d1e
//! 7b1e5d9c3a2f4e6d8c0b1a3e5f7d9c2b name=batch-team models=qwen3-30b-a3b classes=batch tokens_per_minute=20000 max_concurrent=8
//! ```
//! Errors name the line, never the key.

use std::collections::HashMap;
use std::path::PathBuf;

use moe_common::LatencyClass;

use super::{KeyDigest, digest, short_hash};

/// Shortest key accepted: shorter ones are guessable.
pub const MIN_KEY_CHARS: usize = 16;

#[derive(Clone, Debug, PartialEq)]
pub struct KeySpec {
    pub digest: KeyDigest,
    /// Shown in logs and errors: `name=`, or `key-` and 8 hex digits of the key's digest.
    pub name: String,
    /// Models the key may use; None is any.
    pub models: Option<Vec<String>>,
    /// Latency classes the key may use; None is both.
    pub classes: Option<Vec<LatencyClass>>,
    /// max_tokens charged per minute at most; None is unlimited.
    pub tokens_per_minute: Option<u32>,
    /// Streams at once at most; None is unlimited.
    pub max_concurrent: Option<u32>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum KeysError {
    #[error("API keys file {path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("API keys file line {line}: {message}")]
    Line { line: usize, message: String },
    #[error("API keys file has no key")]
    Empty,
}

fn positive(line: usize, name: &str, v: &str) -> Result<u32, KeysError> {
    match v.parse::<u32>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(KeysError::Line {
            line,
            message: format!("{name} must be a whole number from 1 to {}", u32::MAX),
        }),
    }
}

fn list(v: &str) -> Vec<String> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

/// Parses the whole file; any bad line fails it (a reload then keeps the previous keys).
pub fn parse_keys(text: &str) -> Result<Vec<KeySpec>, KeysError> {
    let mut specs: Vec<KeySpec> = Vec::new();
    let mut lines_of: HashMap<KeyDigest, usize> = HashMap::new();
    let mut names: HashMap<String, usize> = HashMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let err = |message: String| KeysError::Line { line, message };
        let mut words = raw.split_whitespace().take_while(|w| !w.starts_with('#'));
        let Some(key) = words.next() else { continue };
        if key.chars().count() < MIN_KEY_CHARS {
            return Err(err(format!(
                "the key is shorter than {MIN_KEY_CHARS} characters"
            )));
        }
        let d = digest(key);
        if let Some(first) = lines_of.insert(d, line) {
            return Err(err(format!("the same key is on line {first}")));
        }
        let mut spec = KeySpec {
            digest: d,
            name: short_hash(&d),
            models: None,
            classes: None,
            tokens_per_minute: None,
            max_concurrent: None,
        };
        for word in words {
            let Some((setting, value)) = word.split_once('=') else {
                return Err(err(format!("{word:?} is not setting=value")));
            };
            match setting {
                "name" => {
                    if value.is_empty() || value.chars().any(char::is_control) {
                        return Err(err("name must be non-empty printable text".into()));
                    }
                    spec.name = value.to_string();
                }
                "models" => spec.models = Some(list(value)),
                "classes" => {
                    let mut classes = Vec::new();
                    for c in list(value) {
                        classes.push(c.parse::<LatencyClass>().map_err(|e| err(e.to_string()))?);
                    }
                    spec.classes = Some(classes);
                }
                "tokens_per_minute" => {
                    spec.tokens_per_minute = Some(positive(line, setting, value)?)
                }
                "max_concurrent" => spec.max_concurrent = Some(positive(line, setting, value)?),
                other => {
                    return Err(err(format!(
                        "unknown setting {other:?} (name, models, classes, tokens_per_minute, max_concurrent)"
                    )));
                }
            }
        }
        if let Some(first) = names.insert(spec.name.clone(), line) {
            return Err(err(format!(
                "name {:?} is already used on line {first}",
                spec.name
            )));
        }
        specs.push(spec);
    }
    if specs.is_empty() {
        return Err(KeysError::Empty);
    }
    Ok(specs)
}
