//! Chat requests on the worker: the GGUF's Jinja chat template rendered with minijinja into
//! segments (template text, where special tokens are parsed, and message content, where they are
//! not), and the output format the template implies (harmony, `<think>`, tool-call markup).
//! Pure code: runs off the engine thread.

mod json;
pub mod prompt;
mod strftime;
pub mod template;
pub mod wire;

pub use prompt::{ChatPrompt, ChatRequest, OutputFormat, Tokenize, ToolChoice, build_prompt};
pub use template::{ChatTemplate, Message, RenderRequest, Segment, TemplateError, ToolCall};
pub use wire::{
    ChatJob, ChatReply, EnginePrompt, ReplyShaper, chat_job, engine_prompt, logprobs_pb,
    resumed_text,
};
