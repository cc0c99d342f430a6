//! The model's tokenizer, usable from any thread: a cheap-to-clone handle on the loaded model's
//! vocabulary. Tokenizing and detokenizing only read the vocabulary (llama-server does both on
//! its HTTP threads while its main loop decodes), so the service prepares prompts — chat
//! templating included — on the blocking pool and the engine thread only decodes.
//!
//! Special tokens: text that spells a special token (`<|im_start|>`, `<|endoftext|>`) becomes
//! that token only with `parse_special = true`. Use it for text the server itself writes (a
//! chat template's markup, a raw completion prompt, which is the client's whole input by
//! contract); never for chat message content, so that a message cannot forge the template's
//! structure.

use std::sync::Arc;

use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;

use super::{EngineError, Prompt};

/// A model's special token ids (None where the model has none) and how prompts start and end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// End of turn (chat models).
    pub eot: Option<u32>,
    /// Whether the model wants BOS at the start of a prompt.
    pub add_bos: bool,
    /// Whether the model wants EOS at the end of a prompt.
    pub add_eos: bool,
}

/// A prompt ready for the engine: its token ids and how to decode after it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PreparedPrompt {
    pub tokens: Vec<u32>,
    /// GBNF constraining the generated text (structured output, forced tool calls).
    pub grammar: Option<String>,
    /// Detokenize generated special tokens as their text (a reply parser reads the markers).
    pub render_special: bool,
}

/// Handle on the loaded model's vocabulary; see the module docs.
#[derive(Clone)]
pub struct Tokenizer {
    model: Arc<LlamaModel>,
    /// The text of every control token (rendered only with special tokens on).
    specials: Arc<[String]>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("n_vocab", &self.n_vocab())
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    pub(super) fn new(model: Arc<LlamaModel>) -> Self {
        let specials = special_texts(&model).into();
        Tokenizer { model, specials }
    }

    /// Token ids of `text`. `add_bos`: prepend BOS (and append EOS) where the model wants them
    /// (see [`SpecialTokens`]); `parse_special`: see the module docs.
    pub fn tokenize(&self, text: &str, add_bos: bool, parse_special: bool) -> Vec<u32> {
        self.model
            .vocab()
            .tokenize(text.as_bytes(), add_bos, parse_special)
            .into_iter()
            .map(|t| t.0 as u32)
            .collect()
    }

    /// The bytes token `id` stands for; a special token's text only with `special` (else
    /// nothing). Bytes, not text: a token may hold part of a UTF-8 character.
    pub fn token_to_bytes(&self, id: u32, special: bool) -> Vec<u8> {
        if id >= self.n_vocab() {
            return Vec::new();
        }
        self.model
            .vocab()
            .token_to_piece(LlamaToken(id as i32), special, None)
    }

    pub fn n_vocab(&self) -> u32 {
        self.model.n_vocab().max(0) as u32
    }

    /// Whether `id` ends generation (EOS, EOT, …).
    pub fn is_eog(&self, id: u32) -> bool {
        id < self.n_vocab() && self.model.vocab().is_eog(LlamaToken(id as i32))
    }

    pub fn special_tokens(&self) -> SpecialTokens {
        let vocab = self.model.vocab();
        let id = |t: LlamaToken| u32::try_from(t.0).ok();
        SpecialTokens {
            bos: id(vocab.bos()),
            eos: id(vocab.eos()),
            eot: id(vocab.eot()),
            add_bos: vocab.should_add_bos(),
            add_eos: vocab.should_add_eos(),
        }
    }

    /// The text of every control token.
    pub fn special_texts(&self) -> &[String] {
        &self.specials
    }

    /// The GGUF's chat template (`tokenizer.chat_template`), if it has one.
    pub fn chat_template(&self) -> Option<String> {
        let t = self.model.chat_template(None).ok()?;
        t.to_str().ok().map(str::to_owned)
    }

    /// Turns a request's prompt into tokens: raw text with BOS and special tokens parsed (the
    /// client wrote the whole prompt), a chat through the GGUF's template (`crate::chat`: only
    /// the template's own text may produce special tokens). Runs the template and the tokenizer:
    /// call it on a blocking thread. A chat also gives what the service needs to shape replies.
    pub fn prepare(
        &self,
        prompt: &Prompt,
    ) -> Result<(PreparedPrompt, Option<crate::chat::ChatReply>), EngineError> {
        let (prepared, reply) = match prompt {
            Prompt::Text(text) => {
                let tokens = self.tokenize(text, true, true);
                (
                    PreparedPrompt {
                        tokens,
                        ..Default::default()
                    },
                    None,
                )
            }
            Prompt::Chat(chat) => {
                let p = self.chat_prompt(chat)?;
                let prepared = PreparedPrompt {
                    tokens: p.tokens,
                    grammar: p.grammar,
                    render_special: p.render_special,
                };
                (prepared, Some(p.reply))
            }
        };
        if prepared.tokens.is_empty() {
            return Err(EngineError::InvalidArgument("prompt has no tokens".into()));
        }
        Ok((prepared, reply))
    }

    /// Renders a chat with the GGUF's Jinja template; template errors are the request's fault.
    fn chat_prompt(
        &self,
        chat: &crate::chat::ChatJob,
    ) -> Result<crate::chat::EnginePrompt, EngineError> {
        let source = self.chat_template().ok_or_else(|| {
            EngineError::InvalidArgument("model has no (UTF-8) chat template".into())
        })?;
        let piece = |t: Option<u32>| {
            t.map(|t| String::from_utf8_lossy(&self.token_to_bytes(t, true)).into_owned())
                .unwrap_or_default()
        };
        let special = self.special_tokens();
        crate::chat::engine_prompt(
            chat,
            &source,
            &piece(special.bos),
            &piece(special.eos),
            self,
        )
        .map_err(|e| EngineError::InvalidArgument(e.to_string()))
    }
}

impl crate::chat::Tokenize for Tokenizer {
    fn tokenize(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<u32> {
        Tokenizer::tokenize(self, text, add_special, parse_special)
    }

    fn special_texts(&self) -> Vec<String> {
        self.specials.to_vec()
    }
}

/// The text of every token that renders only with special tokens on (control tokens).
fn special_texts(model: &LlamaModel) -> Vec<String> {
    let vocab = model.vocab();
    (0..model.n_vocab())
        .map(LlamaToken)
        .filter(|&t| vocab.token_to_piece(t, false, None).is_empty())
        .map(|t| String::from_utf8_lossy(&vocab.token_to_piece(t, true, None)).into_owned())
        .filter(|s| !s.is_empty())
        .collect()
}
