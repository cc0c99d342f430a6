//! `tojson` as Hugging Face's chat templates see it: Python's `json.dumps` with
//! `ensure_ascii=False` — `", "` and `": "` separators, `indent` for pretty output, `sort_keys` —
//! and no HTML escaping (minijinja's own `tojson` escapes `<` and `>` for HTML). Object keys come
//! out in the order of the value's map (request JSON is parsed into sorted maps).

use minijinja::value::Kwargs;
use minijinja::{Error, ErrorKind, Value};
use serde_json::Value as Json;

pub fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    // Python's default; the output is never ASCII-escaped either way.
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(value).map_err(|e| {
        Error::new(ErrorKind::InvalidOperation, "cannot serialize to JSON").with_source(e)
    })?;
    let (item, key) = match separators.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        Some(_) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "separators must be a pair",
            ));
        }
        None if indent.is_some() => (",".into(), ": ".into()),
        None => (", ".into(), ": ".into()),
    };
    let style = Style {
        indent,
        sort_keys: sort_keys.unwrap_or(false),
        item,
        key,
    };
    let mut out = String::new();
    write(&mut out, &json, &style, 0);
    Ok(Value::from_safe_string(out))
}

struct Style {
    indent: Option<usize>,
    sort_keys: bool,
    item: String,
    key: String,
}

fn newline(out: &mut String, style: &Style, depth: usize) {
    if let Some(n) = style.indent {
        out.push('\n');
        out.push_str(&" ".repeat(n * depth));
    }
}

fn write(out: &mut String, v: &Json, style: &Style, depth: usize) {
    match v {
        Json::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item);
                }
                newline(out, style, depth + 1);
                write(out, item, style, depth + 1);
            }
            newline(out, style, depth);
            out.push(']');
        }
        Json::Object(map) if !map.is_empty() => {
            let mut entries: Vec<_> = map.iter().collect();
            if style.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            out.push('{');
            for (i, (k, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item);
                }
                newline(out, style, depth + 1);
                out.push_str(&Json::String(k.clone()).to_string());
                out.push_str(&style.key);
                write(out, item, style, depth + 1);
            }
            newline(out, style, depth);
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use minijinja::Environment;

    fn render(src: &str, v: serde_json::Value) -> String {
        let mut env = Environment::new();
        env.add_filter("tojson", tojson);
        env.render_str(src, minijinja::context! { v => v }).unwrap()
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let v = serde_json::json!({"name": "f", "p": {"b": [1, "<x>"], "a": null}});
        assert_eq!(
            render("{{ v | tojson }}", v.clone()),
            r#"{"name": "f", "p": {"a": null, "b": [1, "<x>"]}}"#
        );
        assert_eq!(
            render("{{ v.p | tojson(indent=2, sort_keys=true) }}", v),
            "{\n  \"a\": null,\n  \"b\": [\n    1,\n    \"<x>\"\n  ]\n}"
        );
    }
}
