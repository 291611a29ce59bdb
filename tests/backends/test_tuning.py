"""Per-machine tuning: measured rates, the tuning file, and their effect on plans and dispatch."""

from __future__ import annotations

import json
import math

import pytest
import torch

from attnkit import patterns as P
from attnkit.backends import _tuning
from attnkit.backends._sparse_plan import choose_block
from attnkit.backends.blocksparse import BlockSparseBackend
from attnkit.cli import main
from attnkit.functional import build_inputs


def _fake(fast_tile: int, *, mask_rate: float = 100.0) -> _tuning.Tuning:
    """Rates under which only ``fast_tile`` runs quickly (10x the others)."""
    rates = {
        d: {
            lay: {b: (1000.0 if b == fast_tile else 100.0) for b in _tuning.TILES}
            for lay in ("band", "gather")
        }
        for d in ("forward", "backward")
    }
    return _tuning.Tuning(rates, 1.2, mask_rate, 64, "measured", _tuning.machine_key(torch.float32))


@pytest.fixture
def tuned(monkeypatch, tmp_path):
    """Tuning switched on, with a private file and nothing loaded."""
    monkeypatch.setenv("ATTNKIT_TUNE", "on")
    monkeypatch.setenv("ATTNKIT_TUNE_FILE", str(tmp_path / "tuning.json"))
    _tuning.forget()
    yield tmp_path / "tuning.json"
    _tuning.forget()


def test_calibration_measures_positive_rates_for_every_tile():
    t = _tuning.calibrate(torch.float32, rows=256, heads=1, head_dim=16)
    values = [r for d in t.kernel_rates.values() for lay in d.values() for r in lay.values()]
    assert len(values) == 2 * 2 * len(_tuning.TILES)
    assert all(math.isfinite(v) and v > 0 for v in [*values, t.gather_copy, t.sdpa_mask_rate])
    assert t.gather_copy >= 1 and t.source == "measured"
    assert t.eager_keys in (0, *_tuning.EAGER_LENGTHS)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_calibration_works_from_inference_code(mode):
    """The first sparse call that measures may come from a model in eval mode."""
    with mode():
        t = _tuning.calibrate(torch.float32, rows=64, heads=1, head_dim=16)
    assert t.eager_keys in (0, *_tuning.EAGER_LENGTHS)


def test_eager_crossover_is_the_longest_length_eager_wins_at_every_shorter_one():
    assert _tuning.eager_crossover({16: (1, 2), 32: (2, 3), 64: (5, 4), 128: (1, 9)}) == 32
    assert _tuning.eager_crossover({16: (3, 2), 32: (1, 3)}) == 0
    assert _tuning.eager_crossover({16: (1, 2), 512: (1, 2)}) == 512


def test_machine_key_names_cpu_torch_threads_and_dtype():
    key = _tuning.machine_key(torch.bfloat16)
    assert (
        torch.__version__ in key and f"{torch.get_num_threads()} threads" in key and key.endswith("bfloat16")
    )


def test_first_use_measures_once_and_stores(tuned, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(_tuning, "calibrate", lambda dtype: calls.append(dtype) or _fake(32))
    first = _tuning.current(torch.float32)
    assert (
        calls == [torch.float32] and "measuring this machine's attention kernels" in capsys.readouterr().err
    )
    assert _tuning.current(torch.float32) is first  # loaded once per process
    _tuning.forget()
    monkeypatch.setattr(_tuning, "calibrate", lambda dtype: pytest.fail("should come from the file"))
    again = _tuning.current(torch.float32)
    assert again.source == "file" and again.kernel_rates == first.kernel_rates
    stored = json.loads(tuned.read_text())
    assert stored["format"] == _tuning.FORMAT and list(stored["entries"]) == [
        _tuning.machine_key(torch.float32)
    ]


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"format": 99, "entries": {}}'])
def test_corrupt_or_foreign_file_warns_and_is_rewritten(tuned, monkeypatch, content):
    tuned.write_text(content)
    monkeypatch.setattr(_tuning, "calibrate", lambda dtype: _fake(64))
    with pytest.warns(RuntimeWarning, match="ignoring the tuning file"):
        t = _tuning.current(torch.float32)
    assert t.kernel_rates["forward"]["band"][64] == 1000.0
    assert json.loads(tuned.read_text())["format"] == _tuning.FORMAT


def test_an_older_format_is_measured_again_quietly(tuned, monkeypatch, recwarn):
    key = _tuning.machine_key(torch.float32)
    tuned.write_text(json.dumps({"format": _tuning.FORMAT - 1, "entries": {key: {"gather_copy": 1.0}}}))
    monkeypatch.setattr(_tuning, "calibrate", lambda dtype: _fake(64))
    assert _tuning.current(torch.float32).eager_keys == 64
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    assert json.loads(tuned.read_text())["format"] == _tuning.FORMAT


def test_a_bad_entry_is_measured_again(tuned, monkeypatch):
    key = _tuning.machine_key(torch.float32)
    tuned.write_text(
        json.dumps({"format": _tuning.FORMAT, "entries": {key: {"kernel_rates": {}, "gather_copy": -1}}})
    )
    monkeypatch.setattr(_tuning, "calibrate", lambda dtype: _fake(128))
    with pytest.warns(RuntimeWarning, match="ignoring the tuning entry"):
        assert _tuning.current(torch.float32).kernel_rates["forward"]["band"][128] == 1000.0


def test_off_uses_the_built_in_rates(monkeypatch):
    monkeypatch.setenv("ATTNKIT_TUNE", "off")
    monkeypatch.setattr(_tuning, "calibrate", lambda dtype: pytest.fail("must not measure"))
    assert _tuning.current(torch.bfloat16) is _tuning.DEFAULT


@pytest.mark.parametrize("fast", [32, 128, 256])
def test_the_measured_rates_choose_the_tile(tuned, monkeypatch, fast):
    """Tiles follow the machine's rates, per dtype: the same pattern gets other tiles when
    another tile size is the fast one."""
    monkeypatch.setattr(_tuning, "calibrate", lambda dtype: _fake(fast if dtype == torch.float32 else 64))
    pattern = P.SlidingWindow(300, 300)
    assert choose_block(pattern, 4096, 4096, "forward", torch.float32) == fast
    assert choose_block(pattern, 4096, 4096, "forward", torch.bfloat16) == 64


def test_the_measured_sdpa_rate_decides_auto(tuned, monkeypatch):
    q = torch.randn(1, 2, 2048, 32)
    inp = build_inputs(q, q, q, pattern=P.SlidingWindow(128, 128))
    monkeypatch.setattr(_tuning, "calibrate", lambda dtype: _fake(64, mask_rate=1e6))  # SDPA "very fast"
    assert "too dense" in BlockSparseBackend.auto_reasons(inp)[0]
    _tuning.forget()
    tuned.unlink()
    monkeypatch.setattr(_tuning, "calibrate", lambda dtype: _fake(64, mask_rate=1.0))
    assert BlockSparseBackend.auto_reasons(inp) == []


def test_auto_keeps_blocksparse_to_the_cpu():
    q = torch.randn(1, 2, 2048, 32, device="meta")
    reasons = BlockSparseBackend.auto_reasons(build_inputs(q, q, q, pattern=P.SlidingWindow(64)))
    assert reasons == ["device=meta: blocksparse is measured and fused on CPU only"]


def test_tune_command(tuned, monkeypatch, capsys):
    monkeypatch.setattr(_tuning, "calibrate", lambda dtype: _fake(32))
    assert main(["tune", "--dtype", "float32", "--force"]) == 0
    out = capsys.readouterr().out
    assert str(tuned) in out and "forward  band   GFLOP/s by tile" in out and "1000.0" in out
    assert main(["tune", "--dtype", "float32"]) == 0
    assert "(from the file)" in capsys.readouterr().out
    monkeypatch.setenv("ATTNKIT_TUNE", "off")
    assert main(["tune"]) == 2
