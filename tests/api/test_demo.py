"""`liger-kernel demo`: both runs train, their curves are printed and agree; a wrong Liger module is caught."""

import io
import re

import pytest

from liger_core import cli, demo
from liger_kernel.transformers import LigerRMSNorm

MODELS = [
    "torch",
    pytest.param(
        "transformers", marks=pytest.mark.skipif(not demo._transformers_available(), reason="needs transformers")
    ),
]


def run_demo(**kwargs) -> tuple[int, str]:
    out = io.StringIO()
    status = demo.run(steps=6, device="cpu", out=out, **kwargs)
    return status, out.getvalue()


def curve_rows(text: str) -> list[tuple[int, float, float]]:
    rows = re.findall(r"^\s*(\d+)\s+([\d.]+)\s+([\d.]+)\s+[\d.e+-]+$", text, flags=re.MULTILINE)
    return [(int(step), float(a), float(b)) for step, a, b in rows]


@pytest.mark.parametrize("model", MODELS)
def test_demo_curves_agree(model):
    status, text = run_demo(model=model)
    assert status == 0, text
    assert "pytorch loss" in text and "liger loss" in text and "OK: the curves agree" in text
    rows = curve_rows(text)
    assert [step for step, _, _ in rows] == list(range(1, 7))
    for _, plain, liger in rows:
        assert plain == pytest.approx(liger, rel=1e-4)
    assert rows[-1][1] < rows[0][1]  # it learns
    assert "LigerRMSNorm" in text and "tokens/s" in text and "MiB" in text


@pytest.mark.parametrize("model", MODELS)
def test_a_wrong_liger_module_makes_the_demo_fail(monkeypatch, model):
    correct = LigerRMSNorm.forward
    monkeypatch.setattr(LigerRMSNorm, "forward", lambda self, x: correct(self, x) + 0.1)  # a stray bias
    status, text = run_demo(model=model)
    assert status != 0
    assert "FAILED: the curves disagree" in text


def test_cli_demo_subcommand(capsys):
    assert cli.main(["demo", "--steps", "3", "--device", "cpu", "--model", "torch"]) == 0
    captured = capsys.readouterr()
    assert "pytorch loss" in captured.out and "liger loss" in captured.out
    assert "3/3" in captured.err  # the progress bar


def test_demo_rejects_bad_arguments():
    with pytest.raises(ValueError, match="steps"):
        demo.run(steps=0)
    with pytest.raises(ValueError, match="model"):
        demo.run(steps=1, model="gpt")
    with pytest.raises(SystemExit):
        cli.main(["demo", "--steps", "0"])
