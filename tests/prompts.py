"""The prompt the handler and client tests send, and its TGI body."""

from __future__ import annotations

import json

PROMPT = "The quick brown fox"
MAX_TOKENS = 12


def tgi_body(stream: bool = False, **parameters) -> str:
    return json.dumps({"inputs": PROMPT, "parameters": {"max_new_tokens": MAX_TOKENS,
                                                        **parameters}, "stream": stream})
