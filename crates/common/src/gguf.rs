//! A reader for GGUF headers: metadata and the tensor table, without touching tensor data.
//! Used to describe a model in its advert and to plan expert placement before loading weights.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::Path;

const MAGIC: &[u8; 4] = b"GGUF";
/// Refuse absurd counts in a corrupt header instead of allocating for them.
const MAX_COUNT: u64 = 1 << 24;
const MAX_STRING: u64 = 1 << 26;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("reading GGUF file: {0}")]
    Io(#[from] io::Error),
    #[error("not a GGUF file (bad magic)")]
    BadMagic,
    #[error("unsupported GGUF version {0}")]
    Version(u32),
    #[error("corrupt GGUF header: {0}")]
    Corrupt(String),
}

/// One metadata value. Arrays keep only their length and element type except for small
/// numeric/string arrays, which planning never needs.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U64(u64),
    I64(i64),
    F64(f64),
    Bool(bool),
    Str(String),
    Array { len: u64 },
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U64(v) => Some(v),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// One tensor's name, ggml type and shape (ggml order: dims[0] is the fastest-varying).
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub ggml_type: u32,
    pub dims: Vec<u64>,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Bytes the tensor's data takes (None for a ggml type this reader does not know).
    pub fn n_bytes(&self) -> Option<u64> {
        let (block, size) = type_block(self.ggml_type)?;
        let row = self.dims.first().copied().unwrap_or(1);
        let rows: u64 = self.dims.iter().skip(1).product();
        Some(row.div_ceil(block) * size * rows)
    }

    /// The layer index of a `blk.N.*` tensor.
    pub fn layer(&self) -> Option<u32> {
        self.name
            .strip_prefix("blk.")?
            .split('.')
            .next()?
            .parse()
            .ok()
    }

    /// Whether this is a routed-expert tensor (`ffn_{up,gate,down,gate_up}_{,ch}exps`), the
    /// tensors `--cpu-moe` keeps in host memory.
    pub fn is_routed_expert(&self) -> bool {
        let Some(rest) = self.name.strip_prefix("blk.") else {
            return false;
        };
        let Some((_, tail)) = rest.split_once('.') else {
            return false;
        };
        let base = tail.split('.').next().unwrap_or("");
        matches!(
            base,
            "ffn_up_exps"
                | "ffn_gate_exps"
                | "ffn_down_exps"
                | "ffn_gate_up_exps"
                | "ffn_up_chexps"
                | "ffn_gate_chexps"
                | "ffn_down_chexps"
                | "ffn_gate_up_chexps"
        )
    }
}

/// Elements per block and bytes per block of each ggml type (ggml.c `type_traits`).
fn type_block(t: u32) -> Option<(u64, u64)> {
    Some(match t {
        0 => (1, 4),      // F32
        1 => (1, 2),      // F16
        2 => (32, 18),    // Q4_0
        3 => (32, 20),    // Q4_1
        6 => (32, 22),    // Q5_0
        7 => (32, 24),    // Q5_1
        8 => (32, 34),    // Q8_0
        9 => (32, 36),    // Q8_1
        10 => (256, 84),  // Q2_K
        11 => (256, 110), // Q3_K
        12 => (256, 144), // Q4_K
        13 => (256, 176), // Q5_K
        14 => (256, 210), // Q6_K
        15 => (256, 292), // Q8_K
        16 => (256, 66),  // IQ2_XXS
        17 => (256, 74),  // IQ2_XS
        18 => (256, 98),  // IQ3_XXS
        19 => (256, 50),  // IQ1_S
        20 => (32, 18),   // IQ4_NL
        21 => (256, 110), // IQ3_S
        22 => (256, 82),  // IQ2_S
        23 => (256, 136), // IQ4_XS
        24 => (1, 1),     // I8
        25 => (1, 2),     // I16
        26 => (1, 4),     // I32
        27 => (1, 8),     // I64
        28 => (1, 8),     // F64
        29 => (256, 56),  // IQ1_M
        30 => (1, 2),     // BF16
        34 => (256, 54),  // TQ1_0
        35 => (256, 66),  // TQ2_0
        39 => (32, 17),   // MXFP4
        _ => return None,
    })
}

/// The parsed header of a GGUF file.
#[derive(Clone, Debug)]
pub struct GgufHeader {
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
}

impl GgufHeader {
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        Self::read(&mut BufReader::new(File::open(path)?))
    }

    pub fn read(r: &mut impl Read) -> Result<Self, GgufError> {
        let mut magic = [0u8; 4];
        r.read_exact(&mut magic)?;
        if &magic != MAGIC {
            return Err(GgufError::BadMagic);
        }
        let version = read_u32(r)?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::Version(version));
        }
        let n_tensors = bounded(read_u64(r)?, "tensor count")?;
        let n_kv = bounded(read_u64(r)?, "metadata count")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = read_string(r)?;
            let ty = read_u32(r)?;
            let value = read_value(r, ty)?;
            metadata.insert(key, value);
        }
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let name = read_string(r)?;
            let n_dims = read_u32(r)?;
            if n_dims > 8 {
                return Err(GgufError::Corrupt(format!("{name}: {n_dims} dimensions")));
            }
            let dims = (0..n_dims).map(|_| read_u64(r)).collect::<Result<_, _>>()?;
            let ggml_type = read_u32(r)?;
            let _offset = read_u64(r)?;
            tensors.push(TensorInfo {
                name,
                ggml_type,
                dims,
            });
        }
        Ok(GgufHeader {
            version,
            metadata,
            tensors,
        })
    }

    pub fn architecture(&self) -> Option<&str> {
        self.metadata.get("general.architecture")?.as_str()
    }

    /// `<architecture>.<key>` as an integer, e.g. `arch_u64("block_count")`.
    pub fn arch_u64(&self, key: &str) -> Option<u64> {
        let arch = self.architecture()?;
        self.metadata.get(&format!("{arch}.{key}"))?.as_u64()
    }

    pub fn name(&self) -> Option<&str> {
        self.metadata.get("general.name")?.as_str()
    }
}

fn bounded(n: u64, what: &str) -> Result<u64, GgufError> {
    if n > MAX_COUNT {
        Err(GgufError::Corrupt(format!("{what} {n} is implausible")))
    } else {
        Ok(n)
    }
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn read_string(r: &mut impl Read) -> Result<String, GgufError> {
    let len = read_u64(r)?;
    if len > MAX_STRING {
        return Err(GgufError::Corrupt(format!("string of {len} bytes")));
    }
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

fn skip(r: &mut impl Read, n: u64) -> io::Result<()> {
    io::copy(&mut r.take(n), &mut io::sink()).and_then(|copied| {
        if copied == n {
            Ok(())
        } else {
            Err(io::ErrorKind::UnexpectedEof.into())
        }
    })
}

fn scalar_size(ty: u32) -> Option<u64> {
    Some(match ty {
        0 | 1 | 7 => 1, // u8, i8, bool
        2 | 3 => 2,
        4..=6 => 4, // u32, i32, f32
        10..=12 => 8,
        _ => return None,
    })
}

fn read_value(r: &mut impl Read, ty: u32) -> Result<Value, GgufError> {
    let mut b8 = [0u8; 8];
    Ok(match ty {
        0 => {
            r.read_exact(&mut b8[..1])?;
            Value::U64(b8[0] as u64)
        }
        1 => {
            r.read_exact(&mut b8[..1])?;
            Value::I64(b8[0] as i8 as i64)
        }
        2 => {
            r.read_exact(&mut b8[..2])?;
            Value::U64(u16::from_le_bytes([b8[0], b8[1]]) as u64)
        }
        3 => {
            r.read_exact(&mut b8[..2])?;
            Value::I64(i16::from_le_bytes([b8[0], b8[1]]) as i64)
        }
        4 => Value::U64(read_u32(r)? as u64),
        5 => Value::I64(read_u32(r)? as i32 as i64),
        6 => Value::F64(f32::from_bits(read_u32(r)?) as f64),
        7 => {
            r.read_exact(&mut b8[..1])?;
            Value::Bool(b8[0] != 0)
        }
        8 => Value::Str(read_string(r)?),
        9 => {
            let elem = read_u32(r)?;
            let len = bounded(read_u64(r)?, "array length")?;
            if elem == 8 {
                for _ in 0..len {
                    let l = read_u64(r)?;
                    if l > MAX_STRING {
                        return Err(GgufError::Corrupt("array string too long".into()));
                    }
                    skip(r, l)?;
                }
            } else {
                let size = scalar_size(elem)
                    .ok_or_else(|| GgufError::Corrupt(format!("array of type {elem}")))?;
                skip(r, size * len)?;
            }
            Value::Array { len }
        }
        10 => Value::U64(read_u64(r)?),
        11 => Value::I64(read_u64(r)? as i64),
        12 => Value::F64(f64::from_bits(read_u64(r)?)),
        other => return Err(GgufError::Corrupt(format!("metadata type {other}"))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }

    /// A minimal two-tensor GGUF header written by hand.
    fn sample() -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(2u64.to_le_bytes()); // tensors
        b.extend(3u64.to_le_bytes()); // kv
        string(&mut b, "general.architecture");
        b.extend(8u32.to_le_bytes());
        string(&mut b, "llama");
        string(&mut b, "llama.expert_count");
        b.extend(4u32.to_le_bytes());
        b.extend(8u32.to_le_bytes());
        string(&mut b, "tokenizer.ggml.tokens");
        b.extend(9u32.to_le_bytes());
        b.extend(8u32.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        string(&mut b, "a");
        string(&mut b, "bc");
        string(&mut b, "blk.3.ffn_up_exps.weight");
        b.extend(3u32.to_le_bytes());
        for d in [64u64, 128, 8] {
            b.extend(d.to_le_bytes());
        }
        b.extend(3u32.to_le_bytes()); // Q4_1
        b.extend(0u64.to_le_bytes());
        string(&mut b, "output_norm.weight");
        b.extend(1u32.to_le_bytes());
        b.extend(64u64.to_le_bytes());
        b.extend(0u32.to_le_bytes()); // F32
        b.extend(0u64.to_le_bytes());
        b
    }

    #[test]
    fn reads_metadata_and_tensor_table() {
        let h = GgufHeader::read(&mut sample().as_slice()).unwrap();
        assert_eq!(h.architecture(), Some("llama"));
        assert_eq!(h.arch_u64("expert_count"), Some(8));
        assert_eq!(h.metadata["tokenizer.ggml.tokens"], Value::Array { len: 2 });
        assert_eq!(h.tensors.len(), 2);
        let exps = &h.tensors[0];
        assert!(exps.is_routed_expert());
        assert_eq!(exps.layer(), Some(3));
        // 64 elements per row = 2 Q4_1 blocks of 20 bytes, 128*8 rows.
        assert_eq!(exps.n_bytes(), Some(2 * 20 * 128 * 8));
        assert!(!h.tensors[1].is_routed_expert());
        assert_eq!(h.tensors[1].n_bytes(), Some(256));
    }

    #[test]
    fn rejects_truncated_and_foreign_files() {
        let data = sample();
        assert!(matches!(
            GgufHeader::read(&mut &data[..data.len() - 3]),
            Err(GgufError::Io(_))
        ));
        assert!(matches!(
            GgufHeader::read(&mut &b"GGML\x03\0\0\0"[..]),
            Err(GgufError::BadMagic)
        ));
    }
}
