"""The int2 kernel's inline PTX, checked on a machine without a GPU.

The interpreter (TRITON_INTERPRET=1, which the CPU tests use) has no PTX, so it runs the kernel's byte-by-byte
unpacking instead of the PTX that a GPU runs. Two checks cover that branch here:

- the PTX text is executed by a small emulator of its four instructions (and, add, xor, shr on 32-bit registers) on
  every byte value in every byte position, against the planes computed as the interpreter computes them;
- a subprocess without TRITON_INTERPRET compiles the kernel for sm_90 (Hopper) with Triton's own ptxas, at every
  tiling `tile` ships: the PTX assembles, the unpacking is in it, and the tiling fits the 227 KiB of shared memory
  a block may use on Hopper, without spilling registers to local memory.
"""

import json
import os
import re
import subprocess
import sys

import pytest

HOPPER_SHARED_BYTES = 232448  # the most dynamic shared memory a block may use on sm_90

COMPILE = r"""
import json, os, subprocess, sys
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import triton
from liger_backends.triton import int2_matmul as module

kernel = module.int2_matmul_kernel
ints = ["M", "N", "K4", "k_span", "stride_am", "stride_plane", "stride_bk", "stride_cm"]
signature = {"A": "*i8", "B": "*u8", "C": "*i32", **{name: "i32" for name in ints}}
binary = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
results = []
for m in (1, 64, 8192):
    block_m, block_n, block_k, warps, stages, left = module.tile(m)
    # Unit strides are specialised as constants and the other integers as multiples of 16, as Triton's runtime does
    # for contiguous operands at these shapes.
    constants = {"stride_ak": 1, "stride_bn": 1, "stride_cn": 1, "BLOCK_M": block_m, "BLOCK_N": block_n,
                 "BLOCK_K": block_k, "GROUP": module.GROUP_M, "SPLIT_K": 1, "EVEN_K": True, "WEIGHTS_LEFT": left}
    sig = dict(signature, **{name: "constexpr" for name in constants})
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in ["A", "B", "C", *ints]}
    source = ASTSource(fn=kernel, signature=sig, constexprs=constants, attrs=attrs)
    options = {"num_warps": warps, "num_stages": stages}
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    usage = ""
    if os.path.exists(binary):
        path = f"/tmp/int2_sm90_{os.getpid()}_{m}.cubin"
        with open(path, "wb") as handle:
            handle.write(compiled.asm["cubin"])
        usage = subprocess.run([binary, "--dump-resource-usage", path], capture_output=True, text=True).stdout
        os.remove(path)
    results.append({"m": m, "shared": compiled.metadata.shared, "ptx": compiled.asm["ptx"], "usage": usage})
print(json.dumps(results))
"""


def planes_minus_one_ptx() -> str:
    from liger_backends.triton import int2_matmul

    text = int2_matmul._PLANES_MINUS_ONE_PTX
    return getattr(text, "value", text)


def run_ptx(text: str, word: int) -> list[int]:
    """Execute the unpacking PTX on one 32-bit input word ($4); returns the outputs $0..$3."""
    registers = {"$4": word}
    mask = 0xFFFFFFFF
    for op, dst, src, operand in re.findall(r"(\w+\.\w+)\s+(\$?\w+),\s*(\$?\w+),\s*(\$?\w+);", text):
        a = registers[src]
        b = int(operand, 0) if operand.startswith("0x") or operand.isdigit() else registers[operand]
        if op == "and.b32":
            value = a & b
        elif op == "xor.b32":
            value = a ^ b
        elif op == "add.u32":
            value = (a + b) & mask
        elif op == "shr.b32":
            value = a >> b
        else:
            raise AssertionError(f"the emulator does not know {op}")
        registers[dst] = value & mask
    return [registers[f"${i}"] for i in range(4)]


def test_unpacking_ptx_gives_every_code_minus_one():
    text = planes_minus_one_ptx()
    assert len(re.findall(r"\w+\.\w+\s", text)) == 15, "the emulator covers every instruction"
    for value in range(256):
        for position in range(4):
            # The byte under test, with different bytes around it: a carry or borrow across bytes would show.
            others = [(value * 7 + 3 * k + 1) & 0xFF for k in range(4)]
            others[position] = value
            word = sum(byte << (8 * k) for k, byte in enumerate(others))
            outputs = run_ptx(text, word)
            for plane, output in enumerate(outputs):
                for k, byte in enumerate(others):
                    got = (output >> (8 * k)) & 0xFF
                    got = got - 256 if got >= 128 else got  # int8
                    assert got == ((byte >> (2 * plane)) & 3) - 1, (value, position, plane, k)


def test_kernel_compiles_for_sm90_with_every_shipped_tiling():
    pytest.importorskip("triton.backends.nvidia")
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    environment["TRITON_DEFAULT_FP_FUSION"] = "1"  # silences triton >= 3.9's notice; int kernels have no FP
    done = subprocess.run(
        [sys.executable, "-c", COMPILE], env=environment, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert [r["m"] for r in results] == [1, 64, 8192]
    for result in results:
        assert "0x7F7F7F7F" in result["ptx"], "the PTX unpacking is compiled in, not the interpreter's"
        assert result["shared"] <= HOPPER_SHARED_BYTES, result["shared"]
        if result["usage"]:
            stack = re.search(r"STACK:(\d+)", result["usage"])
            assert stack is not None and int(stack.group(1)) == 0, f"registers spill at M {result['m']}"
