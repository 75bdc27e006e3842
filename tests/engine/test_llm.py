"""The offline API as a script uses it."""

from __future__ import annotations

import subprocess
import sys


def test_a_script_that_exits_without_shutdown_waits_for_the_weights_move(tiny_llama_dir):
    """Exiting while the weights are still being packed in the background: the exit waits for
    the move, where a daemon thread inside a tensor copy at the interpreter's end aborted the
    process (SIGABRT, exit 134; seen with SmolLM2). The move is slowed down here so that it is
    surely still running at the exit."""
    script = f"""
import time
import engine.model_runner as model_runner
real = model_runner.pack_and_move
def slow_pack_and_move(model):
    time.sleep(1)
    real(model)
    print("moved", flush=True)
model_runner.pack_and_move = slow_pack_and_move
from engine import LLM, SamplingParams
llm = LLM({tiny_llama_dir!r})
assert llm.engine.runner.weight_mover is not None
print(llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2))[0].token_ids, flush=True)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[-1] == "moved", result.stdout
