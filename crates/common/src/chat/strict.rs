//! JSON parsing that refuses fields it does not know: every field the target type would ignore is
//! reported by its path (`messages[0].name`), so an API never silently drops a request option.
//! Ignored values are skipped without being materialised.

use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
pub enum StrictJsonError {
    #[error("{0}")]
    Syntax(#[from] serde_json::Error),
    /// Paths of the fields the type does not know, in document order.
    #[error("unsupported field(s): {}", .0.join(", "))]
    Unknown(Vec<String>),
}

/// Parses `bytes` as `T`, failing with [`StrictJsonError::Unknown`] when any field would be
/// ignored (types with `#[serde(flatten)]` hide their unknown fields from this check).
pub fn from_slice<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StrictJsonError> {
    let mut unknown = Vec::new();
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_ignored::deserialize(&mut de, |path| unknown.push(path_string(&path)))?;
    de.end()?;
    if unknown.is_empty() {
        Ok(value)
    } else {
        Err(StrictJsonError::Unknown(unknown))
    }
}

/// `a.b[2].c` (OpenAI's style of naming a parameter).
fn path_string(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", path_string(parent)),
        Path::Map { parent, key } => {
            let p = path_string(parent);
            if p.is_empty() {
                key.clone()
            } else {
                format!("{p}.{key}")
            }
        }
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => path_string(parent),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    struct Msg {
        #[allow(dead_code)]
        role: String,
    }

    #[derive(Debug, Deserialize)]
    struct Body {
        #[allow(dead_code)]
        messages: Option<Vec<Msg>>,
        n: Option<u32>,
    }

    #[test]
    fn known_fields_parse() {
        let b: Body = from_slice(br#"{"n": 1, "messages": [{"role": "user"}]}"#).unwrap();
        assert_eq!(b.n, Some(1));
    }

    #[test]
    fn unknown_fields_are_named_with_their_path() {
        let e = from_slice::<Body>(
            br#"{"logit_bias": {"1": 2}, "messages": [{"role": "u"}, {"role": "u", "name": "x"}]}"#,
        )
        .unwrap_err();
        match e {
            StrictJsonError::Unknown(p) => assert_eq!(p, ["logit_bias", "messages[1].name"]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn syntax_errors_and_trailing_garbage_are_syntax_errors() {
        assert!(matches!(
            from_slice::<Body>(b"{\"n\": 1} x"),
            Err(StrictJsonError::Syntax(_))
        ));
        assert!(matches!(
            from_slice::<Body>(b"{\"n\": \"one\"}"),
            Err(StrictJsonError::Syntax(_))
        ));
    }
}
