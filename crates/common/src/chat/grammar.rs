//! JSON Schema → llama.cpp GBNF, for grammar-constrained sampling of `response_format`
//! (`json_object`, `json_schema`) and forced tool-call arguments.
//!
//! Supported: `type` (one or a list), `properties`/`required`, `additionalProperties`, `items`,
//! `minItems`/`maxItems`, `minLength`/`maxLength`, `enum`, `const`, `anyOf`/`oneOf`, local `$ref`
//! (`#/$defs/…`, `#/definitions/…`), and annotations (`title`, `description`, `default`,
//! `examples`, `format`, `$schema`, `$id`, `strict`). Every declared property is generated, so
//! output validates whether or not a property is `required` and never has extra keys. Any other
//! keyword (`pattern`, `minimum`, `allOf`, `not`, …) is refused by name rather than ignored.
//! Properties come in the order of the parsed schema map (alphabetical unless serde_json keeps
//! insertion order).
//! Whitespace is bounded so that a model cannot loop on it.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde_json::Value;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GrammarError {
    #[error("JSON schema keyword {0:?} is not supported")]
    Unsupported(String),
    #[error("invalid JSON schema: {0}")]
    Invalid(String),
}

const ANNOTATIONS: &[&str] = &[
    "title",
    "description",
    "default",
    "examples",
    "format",
    "$schema",
    "$id",
    "strict",
    "$comment",
    "deprecated",
    "readOnly",
    "writeOnly",
];
const KEYWORDS: &[&str] = &[
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "minItems",
    "maxItems",
    "minLength",
    "maxLength",
    "enum",
    "const",
    "anyOf",
    "oneOf",
    "$ref",
    "$defs",
    "definitions",
];

const PRIMITIVES: &str = r#"ws ::= [ \n]{0,2}
string ::= "\"" char* "\""
char ::= [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})
integer ::= "-"? ([0-9] | [1-9] [0-9]{1,15})
number ::= integer ("." [0-9]{1,16})? ([eE] [-+]? [0-9]{1,3})?
boolean ::= "true" | "false"
null ::= "null"
value ::= object | array | string | number | boolean | null
object ::= "{" ws ( string ws ":" ws value ( ws "," ws string ws ":" ws value )* )? ws "}"
array ::= "[" ws ( value ( ws "," ws value )* )? ws "]"
"#;

/// A grammar for any JSON object (`response_format: json_object`), then `suffix`.
pub fn json_object_grammar(suffix: &str) -> String {
    GrammarBuilder::default().finish(&format!("object{}", suffix_rule(suffix)))
}

/// A grammar for JSON valid against `schema`, then `suffix` (e.g. the closing tag of a forced
/// tool call).
pub fn schema_grammar(schema: &Value, suffix: &str) -> Result<String, GrammarError> {
    let mut g = GrammarBuilder::default();
    let body = g.schema(schema)?;
    Ok(g.finish(&format!("{body}{}", suffix_rule(suffix))))
}

/// Builds one grammar from several schemas (e.g. "call one of these tools"): each
/// [`GrammarBuilder::schema`] returns an expression to use in the root rule.
#[derive(Debug, Default)]
pub struct GrammarBuilder {
    rules: BTreeMap<String, String>,
    schemas: usize,
}

impl GrammarBuilder {
    /// The expression matching JSON valid against `schema`; its helper rules are kept.
    pub fn schema(&mut self, schema: &Value) -> Result<String, GrammarError> {
        let prefix = if self.schemas == 0 {
            String::new()
        } else {
            format!("s{}", self.schemas)
        };
        self.schemas += 1;
        let mut c = Converter {
            root: schema,
            prefix,
            rules: &mut self.rules,
            refs: BTreeMap::new(),
        };
        c.visit(schema)
    }

    /// The grammar text: `root ::= root_expr`, the helper rules, the JSON primitives.
    pub fn finish(self, root_expr: &str) -> String {
        let mut out = format!("root ::= {root_expr}\n");
        for (name, rule) in &self.rules {
            let _ = writeln!(out, "{name} ::= {rule}");
        }
        out.push_str(PRIMITIVES);
        out
    }
}

fn suffix_rule(suffix: &str) -> String {
    if suffix.is_empty() {
        String::new()
    } else {
        format!(" {}", literal(suffix))
    }
}

/// A GBNF string literal matching `text` exactly.
pub fn literal(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

struct Converter<'a> {
    root: &'a Value,
    /// Prefix of this schema's rule names (several schemas share one grammar).
    prefix: String,
    /// Named rules: `$ref` targets and helpers.
    rules: &'a mut BTreeMap<String, String>,
    /// `$ref` → rule name.
    refs: BTreeMap<String, String>,
}

impl Converter<'_> {
    /// The GBNF expression for `schema`.
    fn visit(&mut self, schema: &Value) -> Result<String, GrammarError> {
        let obj = match schema {
            Value::Bool(true) => return Ok("value".into()),
            Value::Bool(false) => {
                return Err(GrammarError::Invalid(
                    "the schema `false` matches nothing".into(),
                ));
            }
            Value::Object(o) => o,
            _ => return Err(GrammarError::Invalid("a schema must be an object".into())),
        };
        if let Some(k) = obj
            .keys()
            .find(|k| !KEYWORDS.contains(&k.as_str()) && !ANNOTATIONS.contains(&k.as_str()))
        {
            return Err(GrammarError::Unsupported(k.clone()));
        }
        if let Some(r) = obj.get("$ref") {
            return self.reference(r);
        }
        if let Some(c) = obj.get("const") {
            return Ok(literal(&c.to_string()));
        }
        if let Some(e) = obj.get("enum") {
            let items = e
                .as_array()
                .filter(|a| !a.is_empty())
                .ok_or_else(|| GrammarError::Invalid("enum must be a non-empty array".into()))?;
            return Ok(alternatives(items.iter().map(|v| literal(&v.to_string()))));
        }
        if let Some(any) = obj.get("anyOf").or_else(|| obj.get("oneOf")) {
            let items = any.as_array().filter(|a| !a.is_empty()).ok_or_else(|| {
                GrammarError::Invalid("anyOf/oneOf must be a non-empty array".into())
            })?;
            let alts = items
                .iter()
                .map(|s| self.visit(s))
                .collect::<Result<Vec<_>, _>>()?;
            return Ok(alternatives(alts.into_iter()));
        }
        match obj.get("type") {
            None => Ok(if obj.contains_key("properties") {
                self.object(obj)?
            } else {
                "value".into()
            }),
            Some(Value::String(t)) => self.typed(t, obj),
            Some(Value::Array(ts)) => {
                let alts = ts
                    .iter()
                    .map(|t| match t {
                        Value::String(t) => self.typed(t, obj),
                        _ => Err(GrammarError::Invalid("type must name types".into())),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(alternatives(alts.into_iter()))
            }
            Some(_) => Err(GrammarError::Invalid(
                "type must be a string or array".into(),
            )),
        }
    }

    fn typed(
        &mut self,
        t: &str,
        obj: &serde_json::Map<String, Value>,
    ) -> Result<String, GrammarError> {
        Ok(match t {
            "object" => self.object(obj)?,
            "array" => self.array(obj)?,
            "string" => match (uint(obj, "minLength")?, uint(obj, "maxLength")?) {
                (None, None) => "string".into(),
                (min, max) => format!(
                    "\"\\\"\" char{{{},{}}} \"\\\"\"",
                    min.unwrap_or(0),
                    max.map_or(String::new(), |m| m.to_string())
                ),
            },
            "integer" => "integer".into(),
            "number" => "number".into(),
            "boolean" => "boolean".into(),
            "null" => "null".into(),
            other => return Err(GrammarError::Invalid(format!("unknown type {other:?}"))),
        })
    }

    fn object(&mut self, obj: &serde_json::Map<String, Value>) -> Result<String, GrammarError> {
        let Some(props) = obj.get("properties") else {
            return Ok("object".into());
        };
        let props = props
            .as_object()
            .ok_or_else(|| GrammarError::Invalid("properties must be an object".into()))?;
        if let Some(req) = obj.get("required").and_then(Value::as_array)
            && let Some(missing) = req
                .iter()
                .filter_map(Value::as_str)
                .find(|r| !props.contains_key(*r))
        {
            return Err(GrammarError::Invalid(format!(
                "required property {missing:?} is not in properties"
            )));
        }
        if props.is_empty() {
            return Ok("\"{\" ws \"}\"".into());
        }
        let mut parts = Vec::new();
        for (key, schema) in props {
            let v = self.visit(schema)?;
            parts.push(format!(
                "{} ws \":\" ws {v}",
                literal(&Value::String(key.clone()).to_string())
            ));
        }
        Ok(format!(
            "\"{{\" ws {} ws \"}}\"",
            parts.join(" ws \",\" ws ")
        ))
    }

    fn array(&mut self, obj: &serde_json::Map<String, Value>) -> Result<String, GrammarError> {
        let item = match obj.get("items") {
            None => "value".to_string(),
            Some(s) => self.visit(s)?,
        };
        let min = uint(obj, "minItems")?.unwrap_or(0);
        let max = uint(obj, "maxItems")?;
        if max.is_some_and(|m| m < min) {
            return Err(GrammarError::Invalid("maxItems is below minItems".into()));
        }
        let name = format!("{}r{}", self.prefix, self.rules.len());
        self.rules.insert(name.clone(), item);
        let rest = format!("( ws \",\" ws {name} )");
        let body = match (min, max) {
            (_, Some(0)) => return Ok("\"[\" ws \"]\"".into()),
            (0, None) => format!("( {name} {rest}* )?"),
            (0, Some(m)) => format!("( {name} {rest}{{0,{}}} )?", m - 1),
            (n, None) => format!("{name} {rest}{{{},}}", n - 1),
            (n, Some(m)) => format!("{name} {rest}{{{},{}}}", n - 1, m - 1),
        };
        Ok(format!("\"[\" ws {body} ws \"]\""))
    }

    fn reference(&mut self, r: &Value) -> Result<String, GrammarError> {
        let r = r
            .as_str()
            .ok_or_else(|| GrammarError::Invalid("$ref must be a string".into()))?;
        if let Some(name) = self.refs.get(r) {
            return Ok(name.clone());
        }
        let target = r
            .strip_prefix("#/$defs/")
            .map(|n| ("$defs", n))
            .or_else(|| r.strip_prefix("#/definitions/").map(|n| ("definitions", n)))
            .and_then(|(section, n)| self.root.get(section)?.get(n))
            .ok_or_else(|| GrammarError::Unsupported(format!("$ref {r}")))?;
        let name = format!("{}ref{}", self.prefix, self.refs.len());
        self.refs.insert(r.to_string(), name.clone());
        // Inserted before visiting so that recursive schemas terminate.
        self.rules.insert(name.clone(), String::new());
        let body = self.visit(target)?;
        self.rules.insert(name.clone(), body);
        Ok(name)
    }
}

fn uint(obj: &serde_json::Map<String, Value>, key: &str) -> Result<Option<u64>, GrammarError> {
    obj.get(key)
        .map(|v| {
            v.as_u64()
                .ok_or_else(|| GrammarError::Invalid(format!("{key} must be a whole number")))
        })
        .transpose()
}

fn alternatives(items: impl Iterator<Item = String>) -> String {
    let items: Vec<String> = items.collect();
    if items.len() == 1 {
        return items.into_iter().next().unwrap_or_default();
    }
    format!("( {} )", items.join(" | "))
}

#[cfg(test)]
mod tests;
