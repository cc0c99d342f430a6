//! The model fingerprint: a stable identity of the model file a worker serves, advertised as
//! `model_fingerprint` so that a stream moves (migration, retries after the first token) only
//! between workers that would continue it identically. Two workers loading the same GGUF file
//! get the same fingerprint whatever their offload profile, context or version; a different
//! vocabulary, special tokens, tensor layout or weights give a different one.
//!
//! Recipe `v1` (SHA-256, the first 128 bits in hex, prefixed `v1-`), over, in order:
//! - every GGUF metadata key with its value as the GGUF reader parsed it (arrays by length;
//!   this includes `general.*`, the architecture's hyper-parameters and the tokenizer settings);
//! - every tensor's name, ggml type and shape, in file order;
//! - the vocabulary as llama.cpp loaded it: each token's text and whether it is a control or
//!   end-of-generation token, then the special token ids (BOS, EOS, EOT, SEP, NL, PAD) and
//!   whether BOS/EOS are added;
//! - the file length and 256 samples of 4 KiB read at evenly spaced offsets through the file
//!   (1 MiB however large the model): tensor data, so re-quantised or fine-tuned weights with
//!   the same layout differ.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use moe_common::gguf::{GgufHeader, Value};
use sha2::{Digest, Sha256};

const SAMPLES: u64 = 256;
const SAMPLE_BYTES: usize = 4096;

/// The fingerprint of the model loaded from `path` (whose header is `header`).
pub(super) fn fingerprint(
    path: &Path,
    header: &GgufHeader,
    model: &LlamaModel,
) -> std::io::Result<String> {
    let mut h = Sha256::new();
    hash_header(&mut h, header);
    hash_vocabulary(&mut h, model);
    hash_samples(&mut h, &mut File::open(path)?)?;
    Ok(finish(h))
}

fn finish(h: Sha256) -> String {
    let digest = h.finalize();
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("v1-{hex}")
}

/// Length-prefixed, so that concatenations cannot collide.
fn put(h: &mut Sha256, bytes: &[u8]) {
    h.update((bytes.len() as u64).to_le_bytes());
    h.update(bytes);
}

fn hash_header(h: &mut Sha256, header: &GgufHeader) {
    put(h, b"metadata");
    for (key, value) in &header.metadata {
        put(h, key.as_bytes());
        match value {
            Value::U64(v) => put(h, &[&[0u8][..], &v.to_le_bytes()].concat()),
            Value::I64(v) => put(h, &[&[1u8][..], &v.to_le_bytes()].concat()),
            Value::F64(v) => put(h, &[&[2u8][..], &v.to_bits().to_le_bytes()].concat()),
            Value::Bool(v) => put(h, &[3u8, u8::from(*v)]),
            Value::Str(s) => put(h, &[&[4u8][..], s.as_bytes()].concat()),
            Value::Array { len } => put(h, &[&[5u8][..], &len.to_le_bytes()].concat()),
        }
    }
    put(h, b"tensors");
    for t in &header.tensors {
        put(h, t.name.as_bytes());
        h.update(t.ggml_type.to_le_bytes());
        put(
            h,
            &t.dims
                .iter()
                .flat_map(|d| d.to_le_bytes())
                .collect::<Vec<_>>(),
        );
    }
}

fn hash_vocabulary(h: &mut Sha256, model: &LlamaModel) {
    put(h, b"vocabulary");
    let vocab = model.vocab();
    for id in 0..model.n_vocab() {
        let t = LlamaToken(id);
        put(h, vocab.text(t).map_or(&[][..], |s| s.to_bytes()));
        h.update([u8::from(vocab.is_control(t)), u8::from(vocab.is_eog(t))]);
    }
    put(h, b"special");
    for t in [
        vocab.bos(),
        vocab.eos(),
        vocab.eot(),
        vocab.sep(),
        vocab.nl(),
        vocab.pad(),
    ] {
        h.update(t.0.to_le_bytes());
    }
    h.update([
        u8::from(vocab.should_add_bos()),
        u8::from(vocab.should_add_eos()),
    ]);
}

fn hash_samples(h: &mut Sha256, file: &mut (impl Read + Seek)) -> std::io::Result<()> {
    put(h, b"data");
    let len = file.seek(SeekFrom::End(0))?;
    h.update(len.to_le_bytes());
    let mut buf = vec![0u8; SAMPLE_BYTES];
    for i in 0..SAMPLES {
        let at = len * i / SAMPLES;
        file.seek(SeekFrom::Start(at))?;
        let n = (len - at).min(SAMPLE_BYTES as u64) as usize;
        file.read_exact(&mut buf[..n])?;
        put(h, &buf[..n]);
    }
    Ok(())
}

/// A final message's `system_fingerprint` from the parts of the configuration that determine a
/// worker's output (`load::system_fingerprint` lists them): `fp_` and the first 64 bits of the
/// SHA-256 of the parts, each followed by a NUL byte, in hex. The same parts give the same string
/// on every host and version of this function.
pub(super) fn system_fingerprint(parts: &[String]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0u8]);
    }
    let digest = h.finalize();
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("fp_{hex}")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::io::Cursor;

    use moe_common::gguf::TensorInfo;

    use super::*;

    fn header(name: &str, dims: Vec<u64>) -> GgufHeader {
        GgufHeader {
            version: 3,
            metadata: BTreeMap::from([
                ("general.name".to_string(), Value::Str(name.into())),
                ("llama.block_count".to_string(), Value::U64(2)),
            ]),
            tensors: vec![TensorInfo {
                name: "blk.0.ffn_up_exps.weight".into(),
                ggml_type: 1,
                dims,
            }],
        }
    }

    fn of(header: &GgufHeader, data: &[u8]) -> String {
        let mut h = Sha256::new();
        hash_header(&mut h, header);
        hash_samples(&mut h, &mut Cursor::new(data.to_vec())).unwrap();
        finish(h)
    }

    #[test]
    fn the_same_file_gives_the_same_fingerprint() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let a = of(&header("m", vec![4, 8]), &data);
        assert_eq!(a, of(&header("m", vec![4, 8]), &data));
        assert!(a.starts_with("v1-") && a.len() == 3 + 32, "{a}");
    }

    #[test]
    fn metadata_layout_or_sampled_data_change_it() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let base = of(&header("m", vec![4, 8]), &data);
        assert_ne!(base, of(&header("other", vec![4, 8]), &data), "metadata");
        assert_ne!(base, of(&header("m", vec![8, 4]), &data), "shape");
        let mut changed = data.clone();
        // Offset of the 10th sample.
        changed[(100_000 * 10 / SAMPLES) as usize] ^= 1;
        assert_ne!(base, of(&header("m", vec![4, 8]), &changed), "weights");
    }

    #[test]
    fn system_fingerprints_hash_the_parts_with_their_boundaries() {
        let parts = |p: &[&str]| p.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let a = system_fingerprint(&parts(&["v1-ab", "decode_mode=sequential"]));
        // Pinned (SHA-256 of "v1-ab\0decode_mode=sequential\0"): a change of recipe would
        // change every worker's fingerprint, which clients compare across releases.
        assert_eq!(a, "fp_1db0f33bace30d1b");
        assert_eq!(
            a,
            system_fingerprint(&parts(&["v1-ab", "decode_mode=sequential"]))
        );
        assert_ne!(
            a,
            system_fingerprint(&parts(&["v1-a", "bdecode_mode=sequential"])),
            "part boundaries count"
        );
    }

    #[test]
    fn files_smaller_than_the_samples_are_read_whole() {
        let h = header("m", vec![1]);
        assert_ne!(of(&h, b"abc"), of(&h, b"abd"));
        assert_ne!(of(&h, b""), of(&h, b"a"));
    }
}
