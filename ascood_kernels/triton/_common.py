"""Shared host helpers and ``@triton.jit`` building blocks of the Triton backend.

Registration pattern (every op module follows it)
-------------------------------------------------
Each public op ``ascood_triton::<name>`` is a ``torch.library.triton_op`` whose
body allocates the outputs and then runs the op's launcher:

* CUDA tensors: the launcher is called directly and launches the kernels
  through ``torch.library.wrap_triton``, so ``torch.compile``/Inductor sees the
  user kernels and ``triton_op`` derives the fake kernel by tracing the body.
* CPU tensors (only meaningful under the Triton interpreter,
  ``TRITON_INTERPRET=1``): the body calls a private mutating custom op
  ``ascood_triton::_interp_<name>(inputs..., outputs...) -> ()`` that runs the
  same launcher eagerly. Fake tensors / FX tracing then never reach an
  interpreted kernel (which would need real data pointers), so ``opcheck`` and
  ``torch.compile`` also work on CPU under the interpreter.

No fake or autograd kernels are registered here for the public ops:
``triton_op`` uses the body itself as the fake kernel, and the package's
``ascood_kernels/ops/*.py`` registers autograd for both namespaces.
"""
from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton
from triton.language.extra import libdevice

NS = "ascood_triton"

# Magnitude-key kinds: 0 float32, 1 float16, 2 bfloat16, 3 float64 (docs/OPS.md).
KEY_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
# Number of 8-bit radix passes over the (sign-cleared) key bits of each kind.
KEY_PASSES = {0: 4, 1: 2, 2: 2, 3: 8}

# Grid dims 1 and 2 of a CUDA launch are limited to 65535 blocks.
MAX_GRID_YZ = 65535


def fail(msg: str) -> None:
    raise RuntimeError(f"ascood_triton: {msg}")


def check(cond: bool, msg: str) -> None:
    if not cond:
        fail(msg)


def interpreted() -> bool:
    """True when ``triton.jit`` builds interpreted kernels (``TRITON_INTERPRET=1`` at import)."""
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(magnitude_key, InterpretedFunction)


def check_device(t: torch.Tensor, name: str) -> None:
    if t.is_cuda:
        return
    if t.device.type == "cpu" and interpreted():
        return
    fail(f"{name} is on {t.device}; the Triton kernels need CUDA tensors "
         "(or CPU tensors with TRITON_INTERPRET=1 set before importing triton)")


def on_interpreter_path(t: torch.Tensor) -> bool:
    """The op body routes CPU tensors through the private eager op (see module docstring)."""
    return not t.is_cuda


def device_guard(t: torch.Tensor):
    """Triton launches on the *current* CUDA device: make it the tensor's.

    Under the interpreter (numpy), silence numpy's floating-point warnings: the
    kernels compute inf/NaN in lanes that are masked or selected away, exactly
    as the GPU does without a word.
    """
    if t.is_cuda:
        return torch.cuda.device(t.device)
    import numpy as np
    return np.errstate(all="ignore")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def memory_format(t: torch.Tensor) -> torch.memory_format:
    """Output layout of the image ops (docs/OPS.md, "Layout")."""
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def f64_bits(v: float) -> int:
    """The IEEE-754 bits of the double ``v`` as a signed int64.

    Python floats are passed to Triton kernels as fp32 on CUDA, which would
    round the float64 paths' scalars; passing the bits keeps every digit and the
    kernel rounds once to its accumulation type (:func:`scalar_from_bits`).
    """
    return struct.unpack("<q", struct.pack("<d", float(v)))[0]


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def warps_for(elems: int, is64: bool = False) -> int:
    """num_warps for a program holding ``elems`` values per tensor in registers.

    Aims at ~16 values per thread (8 for float64), 4 to 16 warps: checked with
    ptxas for sm_90 to keep the register tiles of every kernel free of spills.
    """
    per_thread = 8 if is64 else 16
    return max(4, min(16, next_pow2(max(elems // per_thread, 1)) // 32))


# --------------------------------------------------------------------------- jit helpers


@triton.jit
def magnitude_key(v, KIND: tl.constexpr):
    """Order-preserving key of |v| from the stored bits; every NaN -> one key above +inf.

    int32 keys for float32/float16/bfloat16, int64 keys for float64; always >= 0.
    """
    if KIND == 0:
        k = v.to(tl.int32, bitcast=True) & 0x7FFFFFFF
        k = tl.where(k > 0x7F800000, 0x7FC00000, k)
    elif KIND == 1:
        k = v.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF
        k = tl.where(k > 0x7C00, 0x7E00, k)
    elif KIND == 2:
        k = v.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF
        k = tl.where(k > 0x7F80, 0x7FC0, k)
    else:
        k = v.to(tl.int64, bitcast=True) & 0x7FFFFFFFFFFFFFFF
        k = tl.where(k > 0x7FF0000000000000, 0x7FF8000000000000, k)
    return k


@triton.jit
def to_acc(v, IS64: tl.constexpr):
    """Convert to the accumulation type: float64 for float64 data, else float32."""
    if IS64:
        r = v.to(tl.float64)
    else:
        r = v.to(tl.float32)
    return r


@triton.jit
def scalar_from_bits(bits, IS64: tl.constexpr):
    """Rebuild a host double from its int64 bits (see ``f64_bits``), rounded once to the acc type."""
    d = bits.to(tl.int64).to(tl.float64, bitcast=True)
    if IS64:
        r = d
    else:
        r = d.to(tl.float32)
    return r


@triton.jit
def mul_rn(a, b, EXACT: tl.constexpr):
    """``a * b`` rounded on its own (never contracted into an FMA with a following add).

    The NVIDIA backend fuses ``x + a*b`` into one FMA by default; the contract
    rounds the product first, so CUDA uses libdevice's ``__nv_fmul_rn``. The
    interpreter (numpy) never fuses, so it uses a plain multiply.
    """
    if EXACT:
        r = libdevice.mul_rn(a, b)
    else:
        r = a * b
    return r


@triton.jit
def div_acc(a, b, IS64: tl.constexpr):
    """IEEE-rounded ``a / b`` (broadcast): ``tl.div_rn`` for float32 (plain ``/`` is
    approximate on NVIDIA GPUs), ``/`` for float64 (always IEEE)."""
    a, b = tl.broadcast(a, b)
    if IS64:
        r = a / b
    else:
        r = tl.div_rn(a, b)
    return r


@triton.jit
def sqrt_acc(a, IS64: tl.constexpr):
    """IEEE-rounded square root (``tl.sqrt_rn`` is float32 only)."""
    if IS64:
        r = tl.sqrt(a)
    else:
        r = tl.sqrt_rn(a)
    return r


@triton.jit
def pick_digit(h, k):
    """Radix-select step on a 256-bin digit histogram ``h`` of the still-active keys.

    Returns (digit, k') where ``digit`` holds the k-th largest active key
    (1 <= k <= sum(h)) and ``k'`` is its rank among the keys with that digit.
    """
    bins = tl.arange(0, 256)
    incl = tl.cumsum(h, 0)
    total = tl.sum(h, 0)
    above = total - incl  # active keys with a larger digit
    hit = (above < k) & (above + h >= k)
    digit = tl.sum(tl.where(hit, bins, 0), 0)
    k_new = k - tl.sum(tl.where(hit, above, 0), 0)
    return digit, k_new


@triton.jit
def digit_of(key, prefix, SHIFT: tl.constexpr):
    """(digit, active) of ``key`` at the pass whose digit starts at bit ``SHIFT``.

    A key is active when its bits above the digit equal the prefix chosen so far.
    (The two shifts keep every shift amount below the key width.)
    """
    active = ((key >> SHIFT) >> 8) == ((prefix >> SHIFT) >> 8)
    digit = ((key >> SHIFT) & 0xFF).to(tl.int32)
    return digit, active


@triton.jit
def zero_key(KIND: tl.constexpr):
    if KIND == 3:
        z = tl.full([], 0, tl.int64)
    else:
        z = tl.full([], 0, tl.int32)
    return z


@triton.jit
def select_in_block(key, valid, K, KIND: tl.constexpr, NPASS: tl.constexpr):
    """Exact k-th largest key of the ``valid`` entries of a block held in registers.

    Returns (t, r): the threshold key and how many keys equal to ``t`` belong to
    the top K (K - #keys > t). Requires 1 <= K <= #valid.
    """
    prefix = zero_key(KIND)
    k = K
    for i in tl.static_range(NPASS):
        digit, active = digit_of(key, prefix, (NPASS - 1 - i) * 8)
        h = tl.histogram(digit, 256, mask=valid & active)
        d, k = pick_digit(h, k)
        prefix = prefix | (d.to(prefix.dtype) << ((NPASS - 1 - i) * 8))
    return prefix, k


@triton.jit
def select_from_hist(hist_row, K, NDONE: tl.constexpr, KIND: tl.constexpr, NPASS: tl.constexpr):
    """Replay the first NDONE radix passes from the per-sample global histograms.

    ``hist_row`` points at this sample's (NPASS, 256) int32 histograms. Every
    program recomputes the (cheap) state itself, so no extra launch is needed.
    """
    prefix = zero_key(KIND)
    k = K
    for i in tl.static_range(NDONE):
        h = tl.load(hist_row + i * 256 + tl.arange(0, 256))
        d, k = pick_digit(h, k)
        prefix = prefix | (d.to(prefix.dtype) << ((NPASS - 1 - i) * 8))
    return prefix, k


@triton.jit
def radix_hist_kernel(g_ptr, hist_ptr, n, K, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                      PASS: tl.constexpr, KIND: tl.constexpr, NPASS: tl.constexpr):
    """One radix pass of the multi-program select: grid (B, cdiv(n, CHUNK)).

    Each program histograms the current digit of the active keys of its chunk
    in registers and adds the 256 counts to hist[b, PASS] with int32 atomics.
    Works on memory order (the selected set does not depend on element order).
    """
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    hist_row = hist_ptr + b * (NPASS * 256)
    prefix, k = select_from_hist(hist_row, K, PASS, KIND, NPASS)
    SHIFT: tl.constexpr = (NPASS - 1 - PASS) * 8
    row = g_ptr + b * n
    start = c * CHUNK
    counts = tl.zeros([256], dtype=tl.int32)
    for j in tl.range(0, CHUNK, BLOCK):
        offs = start + j + tl.arange(0, BLOCK)
        valid = offs < n
        g = tl.load(row + offs, mask=valid, other=0.0)
        key = magnitude_key(g, KIND)
        digit, active = digit_of(key, prefix, SHIFT)
        counts += tl.histogram(digit, 256, mask=valid & active)
    tl.atomic_add(hist_row + PASS * 256 + tl.arange(0, 256), counts, mask=counts > 0, sem="relaxed")


def launch_radix_passes(g: torch.Tensor, B: int, n: int, k: int, chunk: int, block: int):
    """Run the histogram passes of the multi-program select; returns the (B, NPASS, 256) int32 histograms.

    ``g`` is (B, n) contiguous; 1 <= k <= n. No host synchronisation.
    """
    kind = KEY_KIND[g.dtype]
    npass = KEY_PASSES[kind]
    nchunks = triton.cdiv(n, chunk)
    check(nchunks <= MAX_GRID_YZ, f"{n} elements per sample need {nchunks} chunks (> {MAX_GRID_YZ})")
    hist = torch.zeros((B, npass, 256), dtype=torch.int32, device=g.device)
    for p in range(npass):
        wrap_triton(radix_hist_kernel)[(B, nchunks)](
            g, hist, n, k, CHUNK=chunk, BLOCK=block, PASS=p, KIND=kind, NPASS=npass, num_warps=8)
    return hist
