"""Grouped low-bit GEMV over the routed experts of a few tokens: the custom op ``hfqat::lowbit_experts_mv``.

For routed pairs (row t, slot j) with expert ids ``expert_ids[t, j]`` (a device tensor, never read by the host), it
computes ``y[t, j] = x[t] @ W_eᵀ`` from the packed codes of expert ``e``. The experts of one packed expert tensor are
held stacked per width (`ExpertStacks`, same bit layout as `hfqat.export.packing`): for each width present one
``qweight`` (experts, K·bits/32, N) int32, ``scales`` (experts, K/group, N) fp32 and ``zeros`` (same, int16; none when
symmetric), plus ``expert_index`` (widths, num_experts) int32: each expert's place in its width's stack, -1 in the
others. Pairs whose id is no expert (expert-parallel sentinels, ≥ num_experts) get zeros.

The op runs the Triton kernel on CUDA (`triton_lowbit.experts_mv`: one launch per width, every pair of that width in
it) and `experts_mv_reference` elsewhere (the selected experts dequantized exactly as
`hfqat.export.packed.PackedLinear.dequantized_weight` does, then one batched matmul). It has a fake implementation,
so ``torch.compile(fullgraph=True)`` traces through it and CUDA graphs capture it (no host sync anywhere).
"""

from __future__ import annotations

import torch
from torch import nn

from ..packing import code_offset, unpack_kn


def _dequantize_stacked(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                        group_size: int, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """(P, K, N) weights of P stacked packed matrices, in the math of ``PackedLinear.dequantized_weight``."""
    p, rows, n = qweight.shape
    codes = unpack_kn(qweight.permute(1, 0, 2).reshape(rows, p * n), bits, in_features)  # (K, P·N), one unpack
    codes = codes.view(in_features // group_size, group_size, p, n).permute(2, 0, 1, 3)  # (P, groups, group, N)
    zero = code_offset(bits, True) if zeros is None else zeros.to(torch.int32).unsqueeze(2)
    w = (codes - zero).float() * scales.unsqueeze(2)
    return w.reshape(p, in_features, n).to(dtype)


def experts_mv_reference(x: torch.Tensor, expert_ids: torch.Tensor, expert_index: torch.Tensor,
                         qweights: list[torch.Tensor], scales: list[torch.Tensor], zeros: list[torch.Tensor],
                         bits: list[int], group_size: int) -> torch.Tensor:
    """Pure-torch `lowbit_experts_mv` (any device, traceable): dequantize the pairs' experts, one batched matmul."""
    rows, slots = expert_ids.shape
    k, n = x.shape[1], qweights[0].shape[2]
    ids = expert_ids.reshape(-1)
    valid = (ids >= 0) & (ids < expert_index.shape[1])
    pair_x = x.unsqueeze(1).expand(rows, slots, k).reshape(-1, 1, k)
    y = x.new_zeros(rows * slots, n)
    for g, b in enumerate(bits):
        place = expert_index[g][torch.where(valid, ids, 0)]
        sel = place.clamp(min=0).long()
        w = _dequantize_stacked(qweights[g][sel], scales[g][sel], zeros[g][sel] if zeros else None, b, group_size,
                                k, x.dtype)
        y = torch.where((valid & (place >= 0))[:, None], torch.bmm(pair_x, w).squeeze(1), y)
    return y.view(rows, slots, n)


@torch.library.custom_op("hfqat::lowbit_experts_mv", mutates_args=())
def lowbit_experts_mv(x: torch.Tensor, expert_ids: torch.Tensor, expert_index: torch.Tensor,
                      qweights: list[torch.Tensor], scales: list[torch.Tensor], zeros: list[torch.Tensor],
                      bits: list[int], group_size: int) -> torch.Tensor:
    """x (rows, K), expert_ids (rows, slots) → (rows, slots, N): ``y[t, j] = x[t] @ W_{expert_ids[t, j]}ᵀ``."""
    return experts_mv_reference(x, expert_ids, expert_index, qweights, scales, zeros, bits, group_size)


@lowbit_experts_mv.register_kernel("cuda")
def _(x, expert_ids, expert_index, qweights, scales, zeros, bits, group_size):
    from . import triton_lowbit

    return triton_lowbit.experts_mv(x, expert_ids, expert_index, qweights, scales, zeros, bits, group_size)


@lowbit_experts_mv.register_fake
def _(x, expert_ids, expert_index, qweights, scales, zeros, bits, group_size):
    return x.new_empty(*expert_ids.shape, qweights[0].shape[2])


def _triton_lowbit():
    """`triton_lowbit`, or None where triton is missing or too old."""
    try:
        from . import triton_lowbit
    except ImportError:
        return None
    return triton_lowbit


def dequantized_kn(part, dtype: torch.dtype) -> torch.Tensor:
    """The (in, out) float weight of a `hfqat.export.packed.PackedLinear` (a view when not contiguous): on CUDA one
    Triton kernel (`triton_lowbit.dequantize`, the same fp32 math, so the same values), elsewhere
    ``dequantized_weight``. For the prefill path of packed experts, which dequantizes every routed expert."""
    if part.qweight.is_cuda and part.in_features % 32 == 0 and part.group_size % 32 == 0:
        triton_lowbit = _triton_lowbit()
        if triton_lowbit is not None and part.bits in triton_lowbit.KERNEL_BITS:
            return triton_lowbit.dequantize(part.qweight, part.scales, part.zeros, part.bits, part.group_size,
                                            part.in_features, dtype)
    return part.dequantized_weight(dtype).t()


def _triton_applies(parts: list, dtype: torch.dtype) -> bool:
    triton_lowbit = _triton_lowbit() if parts[0].qweight.device.type == "cuda" else None
    return triton_lowbit is not None and all(triton_lowbit.applies(part, dtype) for part in parts)


class ExpertStacks(nn.Module):
    """The experts of one packed expert tensor, stacked per width, and the grouped GEMV over them (``self(x, ids)``).

    Built from `hfqat.export.packed.PackedLinear` experts (same shape, group size and symmetry) for activations of
    `dtype` and up to `max_pairs` routed pairs a call; the parts' buffers become views of the stacks (no second copy).
    The stacks are non-persistent buffers (``qweight<bits>``, ``scales<bits>``[, ``zeros<bits>``], ``expert_index``):
    never saved, moved with the model, and static inputs to CUDA graphs. ``backend``: ``"triton_experts"`` (CUDA,
    where `triton_lowbit.applies` to every expert) or ``"experts_reference"`` (`experts_mv_reference`, exact; CPU, or
    experts the kernel does not take).
    """

    @torch.no_grad()
    def __init__(self, parts: list, dtype: torch.dtype, max_pairs: int) -> None:
        super().__init__()
        device = parts[0].qweight.device
        self.bits = sorted({part.bits for part in parts})
        self.group_size = parts[0].group_size
        self.symmetric = parts[0].zeros is None
        index = torch.full((len(self.bits), len(parts)), -1, dtype=torch.int32)
        for g, b in enumerate(self.bits):
            members = [e for e, part in enumerate(parts) if part.bits == b]
            index[g, members] = torch.arange(len(members), dtype=torch.int32)
            for key in ("qweight", "scales") if self.symmetric else ("qweight", "scales", "zeros"):
                stack = torch.stack([getattr(parts[e], key) for e in members])
                self.register_buffer(f"{key}{b}", stack, persistent=False)
                for i, e in enumerate(members):
                    setattr(parts[e], key, stack[i])
        self.register_buffer("expert_index", index.to(device), persistent=False)
        self.backend = "triton_experts" if _triton_applies(parts, dtype) else "experts_reference"
        if self.backend == "triton_experts":
            from . import triton_lowbit

            triton_lowbit._workspace(device, max_pairs * parts[0].out_features)  # now, not inside a capture

    def stacks(self, key: str) -> list[torch.Tensor]:
        """One stacked tensor per width (ascending): ``key`` is qweight, scales or zeros (none when symmetric)."""
        return [] if key == "zeros" and self.symmetric else [getattr(self, f"{key}{b}") for b in self.bits]

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """x (rows, K), expert_ids (rows, slots) → (rows, slots, N)."""
        args = (x.contiguous(), expert_ids, self.expert_index, self.stacks("qweight"), self.stacks("scales"),
                self.stacks("zeros"), self.bits, self.group_size)
        if x.is_cuda and self.backend == "experts_reference":  # the op's CUDA kernel is Triton's: not for these
            return experts_mv_reference(*args)
        if torch.compiler.is_compiling():
            return torch.ops.hfqat.lowbit_experts_mv(*args)  # opaque to torch.compile
        if not x.is_cuda:  # eager: the implementation itself, skipping the op's dispatch (it costs about a GEMV)
            return experts_mv_reference(*args)
        from . import triton_lowbit

        return triton_lowbit.experts_mv(*args)
