#!/usr/bin/env python3
"""Write a random-weight GGUF with the architecture, tensor names, shapes and
quantization types of gpt-oss-20b as upstream llama.cpp loads it (arch "gpt-oss").

Layout follows llama.cpp src/models/openai-moe.cpp + conversion/gpt_oss.py:
  * expert tensors ffn_{gate,up,down}_exps      : MXFP4 (as in ggml-org's gpt-oss-20b-mxfp4.gguf)
  * token_embd / output / attn_{q,k,v,output}  : Q8_0  (ggml-org file: non-expert weights Q8_0,
                                                  which is what makes it ~12.1 GB)
  * norms, biases, attn_sinks, ffn_gate_inp     : F32   (converter keeps these F32)
Tokenizer: gpt2-style BPE. With --vocab-gguf, the 50257 GPT-2 tokens + 50000 merges (taken from
llama.cpp's models/ggml-vocab-gpt-2.gguf); without it, the 256 byte-level tokens of GPT-2's
byte-to-unicode map and no merges (every byte is one token: self-contained, slower to tokenize).
Then NORMAL filler tokens, then the o200k_harmony special tokens at their real ids
(199998..201087), n_vocab = 201088.

Weights are random with sane scales (no NaN/Inf): MXFP4 E8M0 exponents 118..121
(|w| <= 6 * 2^-8..2^-5), Q8_0 d = 2e-4 (|w| <= ~0.025), F32 ~ N(0, 0.02), norms = 1.

--sparse writes no weights: the data section is a hole of the right size (zeros), enough for
`moectl plan` and the CI check, not for generating.

usage: make_gptoss_like.py OUT.gguf [--vocab-gguf ggml-vocab-gpt-2.gguf] [--layers 24] [--sparse]
"""
import argparse
import sys
import time

import numpy as np
import gguf
from gguf import GGMLQuantizationType as QT

ARCH = "gpt-oss"
N_VOCAB = 201088
N_EMBD = 2880
N_FF_EXP = 2880
N_HEAD = 64
N_HEAD_KV = 8
HEAD_DIM = 64
N_EXPERT = 32
N_EXPERT_USED = 4

# o200k_harmony special tokens (ids as in gpt-oss)
SPECIALS = {
    199998: "<|startoftext|>",
    199999: "<|endoftext|>",
    200002: "<|return|>",
    200003: "<|constrain|>",
    200005: "<|channel|>",
    200006: "<|start|>",
    200007: "<|end|>",
    200008: "<|message|>",
    200012: "<|call|>",
}
FIRST_SPECIAL = 199998


def byte_tokens():
    """GPT-2's bytes_to_unicode: one printable character per byte value."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
    bs += list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def build_vocab(vocab_path):
    if vocab_path is None:
        tokens = byte_tokens()
        types = [gguf.TokenType.NORMAL] * len(tokens)
        merges = []
        return pad_vocab(tokens, types), types, merges
    r = gguf.GGUFReader(vocab_path)
    f = r.fields["tokenizer.ggml.tokens"]
    base_tokens = [bytes(f.parts[i]).decode("utf-8") for i in f.data]
    f = r.fields["tokenizer.ggml.merges"]
    merges = [bytes(f.parts[i]).decode("utf-8") for i in f.data]
    f = r.fields.get("tokenizer.ggml.token_type")
    base_types = [int(f.parts[i][0]) for i in f.data] if f is not None else [1] * len(base_tokens)
    # drop GPT-2's own '<|endoftext|>' (50256): o200k has it at 199999
    keep = [i for i, t in enumerate(base_tokens) if t != "<|endoftext|>"]
    tokens = [base_tokens[i] for i in keep]
    types = [base_types[i] for i in keep]
    return pad_vocab(tokens, types), types, merges


def pad_vocab(tokens, types):
    """Appends filler tokens and the specials (in place) up to N_VOCAB."""
    n = len(tokens)
    for i in range(n, FIRST_SPECIAL):
        tokens.append(f"[FILL{i:06d}]")
        types.append(gguf.TokenType.NORMAL)
    for i in range(FIRST_SPECIAL, N_VOCAB):
        tokens.append(SPECIALS.get(i, f"<|reserved_{i}|>"))
        types.append(gguf.TokenType.CONTROL)
    assert len(tokens) == N_VOCAB and len(set(tokens)) == N_VOCAB
    return tokens


# ---------------------------------------------------------------- raw block generators
RNG = np.random.default_rng(1234)


def rand_bytes(n):
    return np.frombuffer(bytearray(RNG.bytes(n)), dtype=np.uint8)


def mxfp4_bytes(ne):
    """ne = ggml dims (ne0, ne1, ...); returns uint8 array shaped like gguf expects (reversed dims,
    last dim in bytes). block_mxfp4 = {uint8 e; uint8 qs[16]} per 32 values."""
    assert ne[0] % 32 == 0
    nb = ne[0] // 32
    outer = int(np.prod(ne[1:]))
    a = rand_bytes(outer * nb * 17).reshape(outer, nb, 17)
    a[:, :, 0] = RNG.integers(118, 122, size=(outer, nb), dtype=np.uint8)  # E8M0 exponent
    return a.reshape(tuple(reversed(ne[1:])) + (nb * 17,))


def q8_0_bytes(ne, d=2e-4):
    """block_q8_0 = {f16 d; int8 qs[32]}"""
    assert ne[0] % 32 == 0
    nb = ne[0] // 32
    outer = int(np.prod(ne[1:]))
    a = rand_bytes(outer * nb * 34).reshape(outer, nb, 34)
    dbytes = np.frombuffer(np.array([d], dtype="<f2").tobytes(), dtype=np.uint8)
    a[:, :, 0] = dbytes[0]
    a[:, :, 1] = dbytes[1]
    return a.reshape(tuple(reversed(ne[1:])) + (nb * 34,))


def f32(ne, std=0.02, const=None):
    shape = tuple(reversed(ne))
    if const is not None:
        return np.full(shape, const, dtype=np.float32)
    return (RNG.standard_normal(shape, dtype=np.float32) * std).astype(np.float32)


def tensor_plan(n_layer):
    """(name, ggml ne, type, generator) in file order."""
    plan = [
        ("token_embd.weight", (N_EMBD, N_VOCAB), QT.Q8_0),
        ("output_norm.weight", (N_EMBD,), QT.F32),
        ("output.weight", (N_EMBD, N_VOCAB), QT.Q8_0),
    ]
    q, kv = N_HEAD * HEAD_DIM, N_HEAD_KV * HEAD_DIM
    for i in range(n_layer):
        b = f"blk.{i}."
        plan += [
            (b + "attn_norm.weight", (N_EMBD,), QT.F32),
            (b + "post_attention_norm.weight", (N_EMBD,), QT.F32),
            (b + "attn_q.weight", (N_EMBD, q), QT.Q8_0),
            (b + "attn_q.bias", (q,), QT.F32),
            (b + "attn_k.weight", (N_EMBD, kv), QT.Q8_0),
            (b + "attn_k.bias", (kv,), QT.F32),
            (b + "attn_v.weight", (N_EMBD, kv), QT.Q8_0),
            (b + "attn_v.bias", (kv,), QT.F32),
            (b + "attn_output.weight", (q, N_EMBD), QT.Q8_0),
            (b + "attn_output.bias", (N_EMBD,), QT.F32),
            (b + "attn_sinks.weight", (N_HEAD,), QT.F32),
            (b + "ffn_gate_inp.weight", (N_EMBD, N_EXPERT), QT.F32),
            (b + "ffn_gate_inp.bias", (N_EXPERT,), QT.F32),
            (b + "ffn_gate_exps.weight", (N_EMBD, N_FF_EXP, N_EXPERT), QT.MXFP4),
            (b + "ffn_gate_exps.bias", (N_FF_EXP, N_EXPERT), QT.F32),
            (b + "ffn_up_exps.weight", (N_EMBD, N_FF_EXP, N_EXPERT), QT.MXFP4),
            (b + "ffn_up_exps.bias", (N_FF_EXP, N_EXPERT), QT.F32),
            (b + "ffn_down_exps.weight", (N_FF_EXP, N_EMBD, N_EXPERT), QT.MXFP4),
            (b + "ffn_down_exps.bias", (N_EMBD, N_EXPERT), QT.F32),
        ]
    return plan


def make_data(name, ne, t):
    if t == QT.MXFP4:
        return mxfp4_bytes(ne)
    if t == QT.Q8_0:
        return q8_0_bytes(ne)
    if name.endswith("norm.weight"):
        return f32(ne, const=1.0)
    if name.endswith("attn_sinks.weight"):
        return f32(ne, std=1.0)
    return f32(ne)


def nbytes_of(ne, t):
    bs, ts = gguf.GGML_QUANT_SIZES[t]
    n = int(np.prod(ne))
    assert n % bs == 0
    return n // bs * ts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--vocab-gguf", help="GGUF to take the GPT-2 BPE vocabulary from")
    ap.add_argument("--layers", type=int, default=24, help="transformer blocks (gpt-oss-20b: 24)")
    ap.add_argument("--sparse", action="store_true", help="no weights: a hole of the right size")
    args = ap.parse_args()
    t0 = time.time()

    tokens, types, merges = build_vocab(args.vocab_gguf)

    w = gguf.GGUFWriter(args.out, ARCH)
    w.add_name("gpt-oss-20b-synthetic-random")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_MXFP4_MOE)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_block_count(args.layers)
    w.add_context_length(131072)
    w.add_embedding_length(N_EMBD)
    w.add_feed_forward_length(N_FF_EXP)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_rope_freq_base(150000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_expert_count(N_EXPERT)
    w.add_expert_used_count(N_EXPERT_USED)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(32.0)
    w.add_rope_scaling_orig_ctx_len(4096)
    w.add_rope_scaling_yarn_beta_fast(32.0)
    w.add_rope_scaling_yarn_beta_slow(1.0)
    w.add_sliding_window(128)
    w.add_expert_feed_forward_length(N_FF_EXP)

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-4o")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(199998)
    w.add_eos_token_id(200002)
    w.add_pad_token_id(199999)
    w.add_add_bos_token(False)
    # A plain chat template (the real model's harmony template is not needed for random weights):
    # chat requests, e.g. bench/prefix-routing.sh's multi-turn workload, need one.
    w.add_chat_template(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )

    plan = tensor_plan(args.layers)
    total = 0
    for name, ne, t in plan:
        nb = nbytes_of(ne, t)
        total += nb
        if t == QT.F32:
            w.add_tensor_info(name, tuple(reversed(ne)), np.dtype(np.float32), nb)
        else:
            bs, ts = gguf.GGML_QUANT_SIZES[t]
            byte_shape = tuple(reversed(ne[1:])) + (ne[0] // bs * ts,)
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), nb, raw_dtype=t)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    if args.sparse:
        fout = w.fout[0]
        off = gguf.GGUFWriter.ggml_pad(fout.tell(), w.data_alignment)
        for name, ne, t in plan:
            off += gguf.GGUFWriter.ggml_pad(nbytes_of(ne, t), w.data_alignment)
        fout.truncate(off)
        plan = []
    for name, ne, t in plan:
        d = make_data(name, ne, t)
        assert d.nbytes == nbytes_of(ne, t), name
        if d.dtype == np.float32:
            assert np.isfinite(d).all()
        w.write_tensor_data(d)
    w.close()
    print(f"wrote {args.out}: {len(tensor_plan(args.layers))} tensors, {total/1e9:.3f} GB tensor data, "
          f"{time.time()-t0:.1f}s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
