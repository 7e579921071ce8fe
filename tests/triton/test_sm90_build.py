"""The Triton kernels as a GPU builds them, checked on a machine without a GPU.

The CPU tests run the kernels in Triton's interpreter, which checks their arithmetic but not what only a GPU build
refuses: a block or warp count that is no power of two, a tensor-core tile below its minimum, more shared memory than
a block may have, inline PTX that does not assemble. So:

- `sm90_build.py` (run here in a subprocess, without TRITON_INTERPRET) records every kernel launch of every operator
  at the "small" and Llama-8B sizes, every spec case and dtype, and compiles each distinct one for sm_90 (Hopper)
  with Triton's own ptxas: each must build, fit the 227 KiB of shared memory a block may use, and every kernel the
  backend defines must be among them;
- the int2 kernel's unpacking PTX, which the interpreter replaces by byte-by-byte arithmetic, is executed by a small
  emulator of its four instructions on every byte value in every byte position.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

HOPPER_SHARED_BYTES = 232448  # the most dynamic shared memory a block may use on sm_90


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


def test_every_triton_kernel_builds_for_sm90():
    pytest.importorskip("triton.backends.nvidia")
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    environment["TRITON_DEFAULT_FP_FUSION"] = "1"  # silences triton >= 3.9's notice about its coming default
    script = Path(__file__).with_name("sm90_build.py")
    done = subprocess.run(
        [sys.executable, str(script)], env=environment, capture_output=True, text=True, timeout=1200, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    defined = set(rows.pop()["defined"])
    failures = [f"{r['kernel']} {r['options']} {r['constants']}: {r['error']}" for r in rows if "error" in r]
    assert not failures, "\n".join(failures)
    assert defined and defined <= {r["kernel"] for r in rows}, defined - {r["kernel"] for r in rows}
    too_big = [(r["kernel"], r["shared"]) for r in rows if r["shared"] > HOPPER_SHARED_BYTES]
    assert not too_big, too_big
    int2 = [r for r in rows if r["kernel"] == "int2_matmul_kernel"]
    assert int2 and all(r["inline_ptx"] for r in int2), "the int2 kernel's GPU build has its PTX unpacking"
