//! What a worker can do beyond plain generation, advertised for mixed-version fleets: a gateway
//! places a request only on a worker that has every feature the request needs
//! ([`Features::needed_by`]). An advert without the field (a worker older than the field) has
//! none of them. See docs/registry.md (`features`).

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::pb::GenerateRequest;
use crate::pb::v1::{response_format, tool_choice};

/// One capability, named as in the advert's `features` list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Feature {
    /// Chat `messages` rendered with the model's own chat template (GGUF
    /// `tokenizer.chat_template`, Jinja).
    ChatTemplate,
    /// `tools`, `tool_choice`, `parallel_tool_calls`, tool calls in and out of messages.
    Tools,
    /// `response_format` `json_object` / `json_schema` through grammar-constrained sampling.
    JsonSchema,
    /// `logprobs` / `top_logprobs`.
    Logprobs,
    /// Reasoning split from the answer (`reasoning`), `reasoning_effort`, reasoning in messages.
    Reasoning,
    /// The `moe.v1.Worker/WatchPrefixCache` stream of prefix-cache events.
    PrefixCacheEvents,
}

impl Feature {
    pub const ALL: [Feature; 6] = [
        Feature::ChatTemplate,
        Feature::Tools,
        Feature::JsonSchema,
        Feature::Logprobs,
        Feature::Reasoning,
        Feature::PrefixCacheEvents,
    ];

    /// The name used in the advert JSON and in error messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Feature::ChatTemplate => "chat_template",
            Feature::Tools => "tools",
            Feature::JsonSchema => "json_schema",
            Feature::Logprobs => "logprobs",
            Feature::Reasoning => "reasoning",
            Feature::PrefixCacheEvents => "prefix_cache_events",
        }
    }

    pub fn from_name(name: &str) -> Option<Feature> {
        Feature::ALL.into_iter().find(|f| f.as_str() == name)
    }

    fn bit(self) -> u32 {
        1 << self as u8
    }
}

impl fmt::Display for Feature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of features (a bit set: checked for every worker on every placement).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Features(u32);

impl Features {
    pub const NONE: Features = Features(0);

    /// Every feature this version knows: what a current worker advertises.
    pub fn all() -> Features {
        Feature::ALL.into_iter().collect()
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn has(self, f: Feature) -> bool {
        self.0 & f.bit() != 0
    }

    pub fn with(self, f: Feature) -> Features {
        Features(self.0 | f.bit())
    }

    pub fn union(self, other: Features) -> Features {
        Features(self.0 | other.0)
    }

    pub fn iter(self) -> impl Iterator<Item = Feature> {
        Feature::ALL.into_iter().filter(move |f| self.has(*f))
    }

    /// The features of `needed` this set lacks.
    pub fn lacking(self, needed: Features) -> Features {
        Features(needed.0 & !self.0)
    }

    /// Whether this set holds every feature of `needed`.
    pub fn covers(self, needed: Features) -> bool {
        needed.0 & !self.0 == 0
    }

    /// What serving `req` takes beyond plain generation. A raw prompt with default options needs
    /// nothing, so every worker, old or new, can serve it.
    pub fn needed_by(req: &GenerateRequest) -> Features {
        let mut f = Features::NONE;
        if !req.messages.is_empty() {
            f = f.with(Feature::ChatTemplate);
        }
        let tool_messages = req
            .messages
            .iter()
            .any(|m| !m.tool_calls.is_empty() || !m.tool_call_id.is_empty() || m.role == "tool");
        let tool_choice = req
            .tool_choice
            .as_ref()
            .is_some_and(|c| c.mode != tool_choice::Mode::Auto as i32);
        // `parallel_tool_calls` acts only with tools, which need the feature already.
        if !req.tools_json.is_empty() || tool_choice || tool_messages {
            f = f.with(Feature::Tools);
        }
        if req
            .response_format
            .as_ref()
            .is_some_and(|r| r.r#type != response_format::Type::Text as i32)
        {
            f = f.with(Feature::JsonSchema);
        }
        if req.logprobs || req.top_logprobs > 0 {
            f = f.with(Feature::Logprobs);
        }
        let reasoning_messages = req.messages.iter().any(|m| !m.reasoning_content.is_empty());
        if !req.reasoning_effort.is_empty() || reasoning_messages {
            f = f.with(Feature::Reasoning);
        }
        f
    }
}

impl FromIterator<Feature> for Features {
    fn from_iter<I: IntoIterator<Item = Feature>>(iter: I) -> Self {
        iter.into_iter().fold(Features::NONE, Features::with)
    }
}

impl fmt::Display for Features {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.iter().map(Feature::as_str).collect();
        f.write_str(&names.join(", "))
    }
}

/// In the advert: a JSON list of names.
impl Serialize for Features {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter().map(Feature::as_str))
    }
}

/// Names this version does not know (from newer workers) are left out: no request this gateway
/// handles can need them.
impl<'de> Deserialize<'de> for Features {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let names = Vec::<String>::deserialize(d)?;
        Ok(names.iter().filter_map(|n| Feature::from_name(n)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::ChatMessage;
    use crate::pb::v1::{ResponseFormat, ToolChoice};

    #[test]
    fn names_round_trip_and_unknown_names_are_left_out() {
        let all = Features::all();
        let json = serde_json::to_string(&all).unwrap();
        assert_eq!(
            json,
            r#"["chat_template","tools","json_schema","logprobs","reasoning","prefix_cache_events"]"#
        );
        assert_eq!(serde_json::from_str::<Features>(&json).unwrap(), all);
        let f: Features = serde_json::from_str(r#"["tools","teleport"]"#).unwrap();
        assert_eq!(f, Features::NONE.with(Feature::Tools));
        for x in Feature::ALL {
            assert_eq!(Feature::from_name(x.as_str()), Some(x));
        }
    }

    #[test]
    fn a_plain_prompt_needs_nothing() {
        let req = GenerateRequest {
            prompt: "hi".into(),
            max_tokens: 4,
            ..Default::default()
        };
        assert!(Features::needed_by(&req).is_empty());
    }

    #[test]
    fn each_request_option_needs_its_feature() {
        let chat = GenerateRequest {
            messages: vec![ChatMessage {
                role: "user".into(),
                content: "hi".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let needs = |r: &GenerateRequest| Features::needed_by(r);
        assert_eq!(needs(&chat), Features::NONE.with(Feature::ChatTemplate));
        let tools = GenerateRequest {
            tools_json: "[]".into(),
            ..chat.clone()
        };
        assert!(needs(&tools).has(Feature::Tools));
        let forced = GenerateRequest {
            tool_choice: Some(ToolChoice {
                mode: tool_choice::Mode::Required as i32,
                function_name: String::new(),
            }),
            ..chat.clone()
        };
        assert!(needs(&forced).has(Feature::Tools));
        let json = GenerateRequest {
            response_format: Some(ResponseFormat {
                r#type: response_format::Type::JsonObject as i32,
                json_schema: String::new(),
            }),
            ..Default::default()
        };
        assert_eq!(needs(&json), Features::NONE.with(Feature::JsonSchema));
        let text = GenerateRequest {
            response_format: Some(ResponseFormat::default()),
            ..Default::default()
        };
        assert!(needs(&text).is_empty(), "text format is the default");
        let lp = GenerateRequest {
            top_logprobs: 2,
            ..Default::default()
        };
        assert_eq!(needs(&lp), Features::NONE.with(Feature::Logprobs));
        let effort = GenerateRequest {
            reasoning_effort: "low".into(),
            ..chat.clone()
        };
        assert!(needs(&effort).has(Feature::Reasoning));
    }

    #[test]
    fn covers_and_first_missing() {
        let have = Features::NONE.with(Feature::ChatTemplate);
        let need = have.with(Feature::Tools).with(Feature::Logprobs);
        assert!(!have.covers(need));
        assert_eq!(
            have.lacking(need),
            Features::NONE.with(Feature::Tools).with(Feature::Logprobs)
        );
        assert!(Features::all().covers(need));
        assert!(have.covers(Features::NONE));
        assert_eq!(need.to_string(), "chat_template, tools, logprobs");
    }
}
