"""Triton kernels compiled for a Hopper GPU (sm_90: H100 / H200) on a machine without one, with Triton's own compiler
and the ptxas its wheel ships: lowering, layout and register-allocation errors that the CPU interpreter cannot
see (it runs the kernels as numpy). Kernels here are the ones no GPU run has checked yet."""

import itertools

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from hfqat.quant import fused_fake_quant, fused_group_errors  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)


def compile_for_hopper(kernel, signature: dict[str, str], constexprs: dict, num_warps: int) -> bytes:
    source = ASTSource(fn=kernel, signature={**signature, **dict.fromkeys(constexprs, "constexpr")},
                       constexprs=constexprs)
    return triton.compile(source, target=HOPPER, options={"num_warps": num_warps}).asm["cubin"]


@pytest.mark.parametrize("dtype,zero_points,element_weights,group_size",
                         list(itertools.product(("bf16", "fp16", "fp32"), (False, True), (False, True), (32, 128))))
def test_group_error_kernel_compiles_for_hopper(dtype, zero_points, element_weights, group_size):
    # the launch shape `group_error_sums` uses for a 4096-wide layer
    _, meta = fused_fake_quant._launch_shape(4096 * 4096 // group_size, group_size)
    num_warps = meta.pop("num_warps")
    signature = {"w_ptr": f"*{dtype}", "s_ptr": "*fp32", "z_ptr": "*fp32", "bits_ptr": "*i32", "rounded_ptr": "*i32",
                 "f_ptr": f"*{dtype}" if not element_weights else "*fp32", "out_ptr": "*fp32", "n_groups": "i32",
                 "n_quantizers": "i32"}
    cubin = compile_for_hopper(fused_group_errors._group_sums, signature,
                               {**meta, "HAS_Z": zero_points, "HAS_F": element_weights}, num_warps)
    assert cubin[:4] == b"\x7fELF"  # a CUDA binary
