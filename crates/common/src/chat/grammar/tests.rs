use super::*;
use serde_json::json;

#[test]
fn json_object_grammar_ends_with_the_suffix() {
    let g = json_object_grammar("\n</tool_call>");
    assert!(
        g.starts_with("root ::= object \"\\n</tool_call>\"\n"),
        "{g}"
    );
    assert!(g.contains("object ::= "));
}

#[test]
fn object_schema_lists_every_property() {
    let schema = json!({
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                       "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
        "required": ["name", "age", "tags"],
        "additionalProperties": false,
    });
    let g = schema_grammar(&schema, "").unwrap();
    let root = g.lines().next().unwrap();
    let part = |key: &str| {
        let value = match key {
            "name" => "string",
            "age" => "integer",
            _ => r#""[" ws ( r0 ( ws "," ws r0 ){0,2} )? ws "]""#,
        };
        format!(r#""\"{key}\"" ws ":" ws {value}"#)
    };
    // In the order of the parsed map (serde_json may or may not keep insertion order).
    let keys: Vec<String> = schema["properties"]
        .as_object()
        .unwrap()
        .keys()
        .map(|k| part(k))
        .collect();
    assert_eq!(
        root,
        format!(
            r#"root ::= "{{" ws {} ws "}}""#,
            keys.join(r#" ws "," ws "#)
        )
    );
    assert!(g.contains(r#"r0 ::= ( "\"a\"" | "\"b\"" )"#), "{g}");
}

#[test]
fn refs_resolve_and_may_recurse() {
    let schema = json!({
        "$defs": {"node": {"type": "object", "properties": {
            "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}},
        "$ref": "#/$defs/node",
    });
    let g = schema_grammar(&schema, "").unwrap();
    assert!(g.starts_with("root ::= ref0\n"), "{g}");
    assert!(g.contains("ref0 ::= \"{\" ws \"\\\"kids\\\"\""), "{g}");
}

#[test]
fn unsupported_keywords_are_refused_by_name() {
    for (schema, keyword) in [
        (json!({"type": "string", "pattern": "^a"}), "pattern"),
        (
            json!({"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}}),
            "minimum",
        ),
        (json!({"allOf": [{}]}), "allOf"),
    ] {
        assert_eq!(
            schema_grammar(&schema, ""),
            Err(GrammarError::Unsupported(keyword.into())),
            "{schema}"
        );
    }
    assert!(matches!(
        schema_grammar(&json!({"$ref": "http://x"}), ""),
        Err(GrammarError::Unsupported(_))
    ));
    assert!(matches!(
        schema_grammar(
            &json!({"type": "object", "properties": {}, "required": ["x"]}),
            ""
        ),
        Err(GrammarError::Invalid(_))
    ));
}

#[test]
fn literals_escape_quotes_backslashes_and_newlines() {
    assert_eq!(literal("a\"b\\c\nd"), r#""a\"b\\c\nd""#);
    let g = schema_grammar(&json!({"const": "x\"y"}), "").unwrap();
    assert!(g.starts_with(r#"root ::= "\"x\\\"y\"""#), "{g}");
}

#[test]
fn strings_with_length_bounds_and_type_lists() {
    let g = schema_grammar(&json!({"type": ["string", "null"], "maxLength": 5}), "").unwrap();
    assert!(
        g.starts_with(r#"root ::= ( "\"" char{0,5} "\"" | null )"#),
        "{g}"
    );
}

#[test]
fn several_schemas_share_one_grammar_without_name_clashes() {
    let mut g = GrammarBuilder::default();
    let list = json!({"type": "array", "items": {"type": "integer"}});
    let a = g.schema(&list).unwrap();
    let b = g.schema(&list).unwrap();
    assert_ne!(a, b);
    let text = g.finish(&format!("( {a} | {b} )"));
    assert!(
        text.contains("\nr0 ::= integer\n") && text.contains("\ns1r1 ::= integer\n"),
        "{text}"
    );
}
