//! Deterministic prompts of about N tokens: common English words (one token each in most
//! vocabularies), drawn by a fixed-seed generator so every run and every server sees the same text.
//! Each request index gets its own text, so no server can reuse a cached prefix beyond a few tokens.

const WORDS: &[&str] = &[
    "the", "river", "market", "stone", "light", "garden", "winter", "paper", "house", "window",
    "music", "forest", "table", "silver", "morning", "city", "bridge", "water", "story", "field",
    "letter", "summer", "cloud", "road", "train", "green", "small", "quiet", "early", "bright",
    "north", "south", "east", "west", "old", "new", "warm", "cold", "open", "simple", "happy",
    "little", "great", "long", "short", "high", "low", "fast", "slow", "black", "white", "red",
    "blue", "yellow", "friend", "family", "school", "teacher", "doctor", "farmer", "island",
    "mountain", "valley", "ocean", "desert", "village", "castle", "church", "station", "harbor",
    "kitchen", "window", "door", "wall", "floor", "roof", "chair", "book", "pen", "glass", "bread",
    "apple", "orange", "coffee", "tea", "milk", "sugar", "salt", "horse", "dog", "cat", "bird",
    "fish", "tree", "flower", "grass", "rain", "snow", "wind", "fire", "earth", "star", "moon",
    "sun", "and", "of", "to", "in", "with", "from", "over", "under", "near", "far", "after",
];

/// A prompt of `tokens` words for request number `index`.
pub fn build(tokens: u32, index: u64) -> String {
    // SplitMix64: tiny, fixed, and identical on every platform.
    let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03);
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut out = format!("Request {index}.");
    for i in 1..tokens.saturating_sub(3) {
        out.push(' ');
        out.push_str(WORDS[(next() % WORDS.len() as u64) as usize]);
        if i % 12 == 0 {
            out.push('.');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_are_deterministic_and_differ_per_request() {
        assert_eq!(build(64, 3), build(64, 3));
        assert_ne!(build(64, 3), build(64, 4));
        let words = build(128, 0).split_whitespace().count();
        assert!((120..=130).contains(&words), "{words} words");
    }
}
