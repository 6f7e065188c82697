"""Linear layers: dense, or EXL2 kept packed on the device.

Both can hand the CUDA kernels a `Matrix` (csrc/kodkod.h): weights stored
W[k, n] with a chunk table that cuts the rows into pieces that decode on
their own. The torch forward of `EXL2Linear` (dequantize, then matmul) is the
twin every kernel is tested against and the path of every device without the
kernels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import exl2, kernel_layout

FEW_TOKENS = 16  # the CPU in fp32: 2 to this many rows go through W x^T (see linear())
# The GPU: inputs of at most this many tokens multiply the packed weights (one pass of gemv_tokens);
# more dequantize + cuBLAS (at 0.5B, 16 tokens in two passes took 16 us per matrix, that 9).
PACKED_TOKENS = 8


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T + b. On the CPU in fp32 a few rows (2 to FEW_TOKENS: a speculative verify pass) go
    through W x^T: MKL's GEMM for a few rows repacks the whole weight at every call and was 2-4x
    slower than one row (the 0.5B head: 50 ms for one row, 118 ms for 5 through x W^T, 41 ms through
    W x^T). Not in bf16, whose x W^T is the faster form (5 rows through the 0.5B head: 19.8 against
    24.3 ms; its gate projection: 0.36 against 0.47 ms)."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2 and 2 <= x.shape[0] <= FEW_TOKENS:
        y = (weight @ x.t()).t().contiguous()
        return y if bias is None else y + bias
    return F.linear(x, weight, bias)


class Linear(nn.Module):
    """y = x W^T + b, with W dense [out, in]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.kernel_matrix = None  # set by prepare_kernels

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def prepare_kernels(self, ext) -> None:
        """Keep the weight once, as W^T [in, out padded to 32] fp16, shared by torch (a view) and the kernels."""
        out_f, in_f = self.weight.shape
        n = -(-out_f // 32) * 32
        wt = torch.zeros(in_f, n, dtype=torch.float16, device=self.weight.device)
        wt[:, :out_f] = self.weight.detach().t()
        self.weight = nn.Parameter(wt[:, :out_f].t(), requires_grad=False)
        chunks, x_len = kernel_layout.dense_chunks(in_f, self.weight.device)
        self.kernel_matrix = ext.make_matrix(wt, None, None, chunks, None, _half(self.bias), out_f, x_len)
        self.kernel_matrix_direct, self.input_order = self.kernel_matrix, None  # see EXL2Linear


class EXL2Linear(nn.Module):
    """An EXL2 layer in its packed form: q_weight [QR, N], perm [K], q_scale, q_scale_max.

    `forward` is the torch twin: dequantize (cached on the torch path) and matmul. For the
    kernels, q_weight is rearranged once into their layout (engine/kernel_layout.py) and the
    format's word order is not kept (it would double the memory); from then on the layer
    dequantizes with the kernel.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], out_features: int, in_features: int,
                 bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        q_weight = tensors["q_weight"]
        invperm = tensors["q_invperm"].to(torch.int64)
        if invperm.numel() != in_features:
            raise exl2.EXL2FormatError(f"q_invperm has {invperm.numel()} rows, config implies {in_features}")
        n = q_weight.shape[1]
        if n % 32 or n < out_features or n - out_features >= 32:
            raise exl2.EXL2FormatError(f"q_weight has {n} columns for {out_features} outputs")
        self.groups = exl2.parse_groups(tensors["q_groups"], q_weight.shape[0], in_features)
        if tensors["q_scale"].shape != (len(self.groups), n // 8):
            raise exl2.EXL2FormatError(f"q_scale shape {tuple(tensors['q_scale'].shape)} != {(len(self.groups), n // 8)}")
        if not torch.equal(torch.sort(invperm).values, torch.arange(in_features, device=invperm.device)):
            raise exl2.EXL2FormatError("q_invperm is not a permutation")
        perm = torch.argsort(invperm)
        self.x_len = kernel_layout.covered_rows(kernel_layout.chunk_table(self.groups))  # checks group sizes
        self.register_buffer("q_weight", q_weight.contiguous())
        self.register_buffer("q_scale", tensors["q_scale"].contiguous())
        self.register_buffer("q_scale_max", tensors["q_scale_max"].to(torch.float16).contiguous())
        self.register_buffer("q_invperm", invperm.to(torch.int32))
        self.register_buffer("q_groups", tensors["q_groups"].to(torch.int16))
        self.register_buffer("perm", perm.to(torch.int32))
        self.bias = None if bias is None else nn.Parameter(bias.to(dtype), requires_grad=False)
        self.out_features, self.in_features = out_features, in_features
        self.dtype = dtype
        self._dense: torch.Tensor | None = None
        self._prompt_w: torch.Tensor | None = None  # see keep_prompt_weight
        self.kernel_matrix = None
        self._ext = None

    def tensors(self) -> dict[str, torch.Tensor]:
        if self.kernel_matrix is not None:
            raise RuntimeError("this layer holds the kernels' layout, no longer the EXL2 words")
        return {s: getattr(self, s) for s in exl2.SUFFIXES}

    def dequantized(self, block: int = 8192) -> torch.Tensor:
        """The HF weight [out, in] in fp32 (the reference dequantization), `block` columns at a time so
        that a vocabulary-sized head never holds its integer temporaries all at once."""
        if self.kernel_matrix is not None:
            return self._kernel_weight().T.float()
        t = self.tensors()
        n = t["q_weight"].shape[1]
        if n <= block:
            return exl2.dequantize(t, self.out_features)
        parts = []
        for c in range(0, n, block):
            cols = slice(c, min(n, c + block))
            part = dict(t, q_weight=t["q_weight"][:, cols], q_scale=t["q_scale"][:, c // 8:cols.stop // 8])
            parts.append(exl2.dequantize(part))
        return torch.cat(parts)[: self.out_features]

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight [out, in] in the layer's dtype; cached unless the kernels run the layer."""
        if self._dense is not None:
            return self._dense
        w = self.dequantized().to(self.dtype)
        if self.kernel_matrix is None:
            self._dense = w
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_matrix is None or not x.is_cuda:
            return linear(x, self.weight, self.bias)
        return self._kernel_forward(x)

    def prepare_kernels(self, ext, scratch: "DequantScratch") -> None:
        """Use the kernels: up to PACKED_TOKENS tokens run the GEMV, longer inputs dequantize into scratch + matmul."""
        self._ext, self._scratch = ext, scratch
        self._dense = None
        if self.kernel_matrix is None:
            self.q_weight, chunks, _ = kernel_layout.repack(self.q_weight, self.groups, in_place=True)
            self.register_buffer("chunks", chunks)
        self.kernel_matrix = ext.make_matrix(self.q_weight, self.q_scale, self.q_scale_max, self.chunks,
                                             self.perm, _half(self.bias), self.out_features, self.x_len)
        # The same matrix for an input its producer already stored in permuted order (the GEMV's
        # out_index = input_order): no gather through perm.
        self.kernel_matrix_direct = ext.make_matrix(self.q_weight, self.q_scale, self.q_scale_max, self.chunks,
                                                    None, _half(self.bias), self.out_features, self.x_len)
        self.input_order = self.q_invperm

    def _kernel_weight(self, buf: torch.Tensor | None = None) -> torch.Tensor:
        """W^T [in, out] in fp16 from the dequantization kernel, rows in their original order (no
        gather of x), written into `buf` (in x n elements) when given, else into a new tensor."""
        k, n = self.in_features, self.q_weight.shape[1]
        w = torch.empty(k, n, dtype=torch.float16, device=self.q_weight.device) if buf is None else buf.view(k, n)
        self._ext.dequant(self.kernel_matrix, w)
        return w[:, :self.out_features]

    def prompt_weight_bytes(self) -> int:
        return self.in_features * self.q_weight.shape[1] * 2

    def keep_prompt_weight(self) -> None:
        """Dequantize once, now, and keep the fp16 weight for inputs of more than PACKED_TOKENS
        tokens (prompts), which then skip their dequantization (0.7 ms of a 0.5B prompt's forward
        on the H100) for prompt_weight_bytes() of device memory. The same values as dequantizing
        each time: the same kernel writes them."""
        self._prompt_w = self._kernel_weight()

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        from .kernels import IN_HALF, OUT_HALF

        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k).to(torch.float16)
        if x2.shape[0] == 1:
            out = torch.empty(self.out_features, dtype=torch.float16, device=x.device)
            self._ext.gemv([self.kernel_matrix], x2[0].contiguous(), IN_HALF, None, None, 0.0, OUT_HALF, 0, [out])
            return out.view(*lead, self.out_features).to(x.dtype)
        if x2.shape[0] <= PACKED_TOKENS:  # speculative verification: the packed weights read once
            out = torch.empty(x2.shape[0], self.out_features, dtype=torch.float16, device=x.device)
            self._ext.gemv_tokens(self.kernel_matrix, x2.contiguous(), out, self._scratch.get(8 * self.x_len, x.device))
            return out.view(*lead, self.out_features).to(x.dtype)
        w = self._prompt_w
        if w is None:
            w = self._kernel_weight(self._scratch.get(k * self.q_weight.shape[1], x.device))
        y = x2 @ w if self.bias is None else torch.addmm(self.bias, x2, w)
        return y.view(*lead, self.out_features).to(x.dtype)


class DequantScratch:
    """One fp16 buffer for prefill's dequantized weights, shared by every layer. Its size is fixed
    before any CUDA graph captures it; a larger request (the head over many tokens, outside the
    graphs) gets a temporary buffer instead, so a captured address is never freed."""

    def __init__(self, numel: int = 0, device=None):
        self.buf = torch.empty(numel, dtype=torch.float16, device=device) if numel else None

    def get(self, numel: int, device) -> torch.Tensor:
        if self.buf is None or self.buf.numel() < numel:
            return torch.empty(numel, dtype=torch.float16, device=device)
        return self.buf[:numel]


def _half(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().to(torch.float16).contiguous()
