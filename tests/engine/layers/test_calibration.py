"""The small-batch kernels' row limit timed per machine (engine/layers/calibration.py): the count
chosen from the timings, one row count per step, the limit raised and never lowered, nothing to
choose without oneDNN's path; and the engine, once it has raised the limit, still gives
transformers' greedy tokens through the kernels and the C++ decoder stack at more sequences."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine import LLM, SamplingParams
from engine.kernels import cpu_ops
from engine.layers import calibration
from engine.layers.calibration import CANDIDATE_ROWS, SmallBatchCalibration, choose_max_rows
from engine.layers.linear import PackedLinear, can_pack
from tests.tiny_models import hf_greedy, random_prompts

needs_onednn = pytest.mark.skipif(not can_pack(torch.device("cpu"), torch.float32),
                                  reason="no oneDNN")


@pytest.fixture
def kernels() -> None:
    assert cpu_ops.load(), "the C++ CPU kernels did not build (see the log)"


@pytest.mark.parametrize(("timings", "expected"), [
    ({8: (1.0, 2.0), 16: (1.0, 2.0), 32: (3.0, 2.0)}, 16),
    ({8: (1.0, 2.0), 16: (1.0, 2.0), 32: (1.0, 2.0)}, 32),
    ({8: (2.0, 1.0)}, 4),
    ({8: (1.0, 1.0)}, 4),  # a tie is no win
    ({8: (1.0, 2.0), 16: (3.0, 2.0), 32: (1.0, 2.0)}, 8),  # not past a loss
    ({}, 4),
])
def test_the_largest_count_up_to_which_the_kernels_won(timings, expected):
    assert choose_max_rows(4, timings) == expected


def _model(quantizations: tuple[str | None, ...]) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(*(PackedLinear(torch.randn(64, 96), None, q) for q in quantizations))
    for m in model:
        m.pack()
    return model


@needs_onednn
def test_one_row_count_a_step_until_the_kernels_lose(kernels, monkeypatch):
    model = _model((None, None, "w8a8"))
    plain, w8a8 = model[0], model[2]
    floors = (plain.max_small_batch_rows, w8a8.max_small_batch_rows)
    timed = []

    def fake(linears, rows, dtype):
        timed.append((rows, len(linears)))
        return (1.0, 2.0) if rows <= 16 else (3.0, 2.0)

    monkeypatch.setattr(calibration, "_time_paths", fake)
    calibrating = SmallBatchCalibration(model, torch.float32)
    candidates = [r for r in CANDIDATE_ROWS if r > floors[0]]
    assert calibrating.pending == candidates
    for _ in candidates[:-1]:
        assert calibrating.step() is None and not calibrating.is_done
    chosen = calibrating.step()
    assert calibrating.is_done and chosen == max([floors[0]] + [r for r in candidates if r <= 16])
    assert timed == [(r, 2) for r in candidates]  # w8a8 has no oneDNN path: never timed
    assert plain.max_small_batch_rows == model[1].max_small_batch_rows == chosen
    assert w8a8.max_small_batch_rows == floors[1]
    assert calibrating.step() is None  # done: nothing more is timed
    assert len(timed) == len(candidates)


@needs_onednn
def test_a_first_loss_keeps_each_linears_own_limit(kernels, monkeypatch):
    model = _model((None, "int8"))
    floors = [m.max_small_batch_rows for m in model]
    monkeypatch.setattr(calibration, "_time_paths", lambda linears, rows, dtype: (2.0, 1.0))
    calibrating = SmallBatchCalibration(model, torch.float32)
    assert calibrating.step() == min(floors)
    assert calibrating.is_done
    assert [m.max_small_batch_rows for m in model] == floors


def test_nothing_to_choose_before_packing(monkeypatch):
    model = nn.Sequential(PackedLinear(torch.randn(64, 96), None))  # not packed: no oneDNN yet
    monkeypatch.setattr(calibration, "_time_paths", lambda *a: pytest.fail("timed"))
    calibrating = SmallBatchCalibration(model, torch.float32)
    assert calibrating.is_done and calibrating.step() is None


@needs_onednn
def test_real_timings_choose_by_the_rule_and_the_path_taken_is_right(kernels):
    model = _model((None, None))
    floor = model[0].max_small_batch_rows
    calibrating = SmallBatchCalibration(model, torch.float32)
    while not calibrating.is_done:
        calibrating.step()
    chosen = calibrating.max_rows
    assert chosen == choose_max_rows(floor, calibrating.timings)
    assert all(m.max_small_batch_rows == chosen for m in model)
    for rows in (chosen, chosen + 1):  # the last row count the kernels take, the first past it
        x = torch.randn(rows, 96)
        for m in model:
            torch.testing.assert_close(m(x), F.linear(x, m.weight), rtol=1e-4, atol=1e-4)


@needs_onednn
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_greedy_tokens_unchanged_once_the_kernels_take_more_rows(kernels, tiny_model_dirs,
                                                                 kind, monkeypatch):
    folder = tiny_model_dirs[kind]
    llm = LLM(folder)
    runner = llm.engine.runner
    runner.wait_for_weight_mover()
    monkeypatch.setattr(calibration, "_time_paths", lambda linears, rows, dtype: (1.0, 2.0))
    while not runner.calibrate_small_batch_rows():
        pass
    assert runner.max_stack_rows == max(CANDIDATE_ROWS)
    prompts = random_prompts(7, 3, 20, seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    outputs = llm.generate(prompts, params)
    assert runner.decoder_stack is not None  # seven sequences decoded through it
    assert [o.token_ids for o in outputs] == [hf_greedy(folder, p, 8) for p in prompts]


@needs_onednn
def test_a_failed_timing_leaves_the_limits_and_the_engine_serving(kernels, tiny_model_dirs,
                                                                  monkeypatch):
    llm = LLM(tiny_model_dirs["llama"])
    runner = llm.engine.runner
    runner.wait_for_weight_mover()
    before = runner.max_stack_rows

    def broken(linears, rows, dtype):
        raise RuntimeError("a kernel failed")

    monkeypatch.setattr(calibration, "_time_paths", broken)
    llm.engine.when_idle()  # as the step loop calls it; it must not raise
    assert runner.calibrate_small_batch_rows()  # nothing left to time
    assert runner.max_stack_rows == before
    prompt = random_prompts(1, 5, 5, seed=4)[0]
    [output] = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=4,
                                                     ignore_eos=True))
    assert output.token_ids == hf_greedy(tiny_model_dirs["llama"], prompt, 4)
