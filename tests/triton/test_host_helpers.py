"""The launchers' host-side arithmetic matches Triton's own helpers, which it replaces for speed."""

import triton
from liger_backends.triton.rms_norm import cdiv, next_power_of_2

VALUES = [0, 1, 2, 3, 4, 5, 7, 8, 9, 63, 64, 65, 127, 128, 129, 1000, 4096, 4097, 128256, 262143, 262144, 2**31 + 5]


def test_next_power_of_2_matches_triton():
    for n in VALUES:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n


def test_cdiv_matches_triton():
    for a in VALUES:
        for b in (1, 2, 3, 16, 128, 1000, 4096):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)
