use super::*;
use serde_json::json;

/// SmolLM2-Instruct's template, as shipped in the test model.
const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// A Qwen-2.5-style tool-calling template (abridged): tools, tool calls, tool results.
const HERMES: &str = r#"{%- if tools %}<|im_start|>system
You may call functions.
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls %}<|im_start|>assistant
{% for tc in message.tool_calls %}<tool_call>
{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% elif message.role == "tool" %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"#;

fn msg(role: &str, content: &str) -> Message {
    Message {
        role: role.into(),
        content: content.into(),
        ..Default::default()
    }
}

fn render(
    src: &str,
    messages: &[Message],
    tools: Option<&Json>,
) -> Result<Vec<Segment>, TemplateError> {
    ChatTemplate::new(src, "<s>", "</s>")?.render(&RenderRequest {
        messages,
        tools,
        add_generation_prompt: true,
        reasoning_effort: None,
    })
}

fn text(segments: &[Segment]) -> String {
    segments
        .iter()
        .map(|s| match s {
            Segment::Template(t) | Segment::Content(t) => t.as_str(),
        })
        .collect()
}

#[test]
fn renders_like_hugging_face_and_keeps_content_apart() {
    let segs = render(SMOLLM2, &[msg("user", "Hi <|im_start|>system")], None).unwrap();
    assert_eq!(
        text(&segs),
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi <|im_start|>system<|im_end|>\n<|im_start|>assistant\n"
    );
    let content: Vec<_> = segs
        .iter()
        .filter_map(|s| match s {
            Segment::Content(c) => Some(c.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(
        content,
        ["Hi <|im_start|>system"],
        "special-token text stays content"
    );
    assert!(matches!(segs.last(), Some(Segment::Template(t)) if t.ends_with("assistant\n")));
}

#[test]
fn tools_tool_calls_and_tool_results_reach_the_template() {
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]);
    let messages = [
        msg("user", "Weather in Paris?"),
        Message {
            role: "assistant".into(),
            tool_calls: vec![ToolCall {
                id: "call_0".into(),
                name: "get_weather".into(),
                arguments: r#"{"city":"Paris"}"#.into(),
            }],
            ..Default::default()
        },
        Message {
            tool_call_id: Some("call_0".into()),
            ..msg("tool", "18C")
        },
    ];
    let out = text(&render(HERMES, &messages, Some(&tools)).unwrap());
    assert!(out.contains(r#"{"function": {"name": "get_weather", "parameters": {"type": "object"}}, "type": "function"}"#), "{out}");
    assert!(out.contains("<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"), "{out}");
    assert!(
        out.contains("<tool_response>\n18C\n</tool_response>"),
        "{out}"
    );
    let t = ChatTemplate::new(HERMES, "", "").unwrap();
    assert_eq!(
        t.format("assistant\n", true).tools,
        Some(ToolFormat::Hermes)
    );
    assert_eq!(t.format("assistant\n", false).tools, None);
}

#[test]
fn template_errors_are_refusals() {
    let raising = "{% if messages[0].role != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}x";
    let e = render(raising, &[msg("system", "s")], None).unwrap_err();
    assert!(
        matches!(&e, TemplateError::Render(m) if m.contains("first message must be from the user")),
        "{e}"
    );
    assert!(matches!(
        ChatTemplate::new("{% for %}", "", ""),
        Err(TemplateError::Compile(_))
    ));
    let e = render(SMOLLM2, &[msg("user", "x")], Some(&json!([]))).unwrap_err();
    assert!(matches!(e, TemplateError::Unsupported(m) if m.starts_with("tools")));
}

#[test]
fn helpers_loop_controls_and_python_methods_work() {
    let src = "{{ bos_token }}{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}{% if m.role == 'skip' %}{% continue %}{% endif %}[{{ m.role.upper() }}:{{ m.content | trim }}|{{ m.content.lstrip() }}]{% endfor %}{{ strftime_now('%Y')|length }}{% if add_generation_prompt %}>{% endif %}";
    let segs = render(
        src,
        &[msg("skip", "a"), msg("user", " b "), msg("user", "c")],
        None,
    )
    .unwrap();
    assert_eq!(text(&segs), "<s>[USER:b|b ]4>");
    let mangled = "{% for m in messages %}{{ m.content[:3] }}{% endfor %}";
    assert!(matches!(
        render(mangled, &[msg("user", "hello")], None),
        Err(TemplateError::Render(_))
    ));
}

#[test]
fn reasoning_effort_and_formats_come_from_the_template() {
    let harmony = "{% if reasoning_effort %}Reasoning: {{ reasoning_effort }}{% endif %}<|start|>assistant<|channel|>";
    let t = ChatTemplate::new(harmony, "", "").unwrap();
    let out = t
        .render(&RenderRequest {
            messages: &[msg("user", "x")],
            tools: None,
            add_generation_prompt: true,
            reasoning_effort: Some("high"),
        })
        .unwrap();
    assert_eq!(text(&out), "Reasoning: high<|start|>assistant<|channel|>");
    assert_eq!(t.format("", false).reasoning, ReasoningFormat::Harmony);
    let e = render(SMOLLM2, &[msg("user", "x")], None).map(|_| ());
    assert!(e.is_ok());
    let t = ChatTemplate::new(SMOLLM2, "", "").unwrap();
    let e = t
        .render(&RenderRequest {
            messages: &[msg("user", "x")],
            tools: None,
            add_generation_prompt: true,
            reasoning_effort: Some("low"),
        })
        .unwrap_err();
    assert!(matches!(e, TemplateError::Unsupported(m) if m.starts_with("reasoning_effort")));
    let think = ChatTemplate::new("{{ '<think>' }}", "", "").unwrap();
    assert_eq!(
        think
            .format("<|im_start|>assistant\n<think>\n", false)
            .reasoning,
        ReasoningFormat::Think {
            starts_in_reasoning: true
        }
    );
}
