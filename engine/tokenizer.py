"""The engine's tokenizer: `tokenizers`' fast backend encodes and decodes; transformers' tokenizer
does what only it does (chat templates), and may load after the engine is ready.

transformers' import scans every model's sources and checks its dependencies' versions: 0.5-0.8 s
of a core holding the GIL, on the path to a cold start's first token. A tensorized artifact
carries what the engine needs of its tokenizer, written by transformers itself at `tensorize`
time (`FACTS_FILE`: the end-of-sequence and special ids, the token texts its decode changes),
beside the backend it configured (`tokenizer.json`): from those the engine encodes and decodes
at once and imports transformers only when a chat template is first wanted.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

FACTS_FILE = "engine_tokenizer.json"
BACKEND_FILE = "tokenizer.json"
FACTS_VERSION = 1


@dataclass(frozen=True)
class TokenizerFacts:
    """What the engine needs of a transformers tokenizer beyond its fast backend."""

    eos_token_id: int | None
    special_token_ids: tuple[int, ...]
    has_chat_template: bool
    # Token ids whose text transformers' decode changes after the backend's (its
    # `clean_up_tokenization_spaces`); empty for most models.
    token_text_overrides: dict[int, str] = field(default_factory=dict)
    # The longest vocabulary entry's length in characters (None: not written, from facts
    # written before it; read off the vocabulary then: ~25 ms of a cold start for 49k entries).
    max_token_chars: int | None = None

    @classmethod
    def of(cls, hf_tokenizer: Any) -> TokenizerFacts:
        overrides = {}
        if getattr(hf_tokenizer, "clean_up_tokenization_spaces", False):
            # Rare, and decided inside transformers per tokenizer: compare every id once.
            backend = hf_tokenizer.backend_tokenizer
            ids = range(backend.get_vocab_size(with_added_tokens=True))
            texts = hf_tokenizer.batch_decode([[i] for i in ids])
            overrides = {i: text for i, text in zip(ids, texts, strict=True)
                         if text != backend.decode([i], skip_special_tokens=False)}
        return cls(hf_tokenizer.eos_token_id, tuple(hf_tokenizer.all_special_ids),
                   bool(getattr(hf_tokenizer, "chat_template", None)), overrides,
                   longest_token_chars(hf_tokenizer.backend_tokenizer))

    def to_json(self) -> str:
        return json.dumps({
            "version": FACTS_VERSION, "eos_token_id": self.eos_token_id,
            "special_token_ids": list(self.special_token_ids),
            "has_chat_template": self.has_chat_template,
            "token_text_overrides": {str(i): t for i, t in self.token_text_overrides.items()},
            "max_token_chars": self.max_token_chars,
        }, ensure_ascii=False, indent=1)

    @classmethod
    def from_json(cls, text: str) -> TokenizerFacts | None:
        """None for facts written by another version (the caller loads transformers')."""
        data = json.loads(text)
        if data.get("version") != FACTS_VERSION:
            return None
        return cls(data["eos_token_id"], tuple(data["special_token_ids"]),
                   data["has_chat_template"],
                   {int(i): t for i, t in data["token_text_overrides"].items()},
                   data.get("max_token_chars"))


class Tokenizer:
    def __init__(self, backend: Any, facts: TokenizerFacts,
                 load_hf: Callable[[], Any] | None = None, hf_tokenizer: Any = None):
        """`backend`: a `tokenizers.Tokenizer`; `load_hf` gives transformers' tokenizer when
        first needed (or `hf_tokenizer`, already loaded)."""
        self.backend = backend
        self.facts = facts
        self._load_hf = load_hf
        self._hf_tokenizer = hf_tokenizer
        self._lock = threading.Lock()
        self._is_preloading = False
        # Loaded with transformers' tokenizer at hand, encode as it does (the facts are written
        # only where the backend alone encodes the same).
        self._hf_encode = hf_tokenizer.encode if hf_tokenizer is not None else None

    @classmethod
    def from_hf(cls, hf_tokenizer: Any) -> Tokenizer:
        return cls(hf_tokenizer.backend_tokenizer, TokenizerFacts.of(hf_tokenizer),
                   hf_tokenizer=hf_tokenizer)

    @classmethod
    def from_folder_facts(cls, folder: Path, load_hf: Callable[[], Any]) -> Tokenizer | None:
        """From a folder's facts and backend, transformers not imported; None if it has none."""
        facts_path = folder / FACTS_FILE
        if not facts_path.exists() or not (folder / BACKEND_FILE).exists():
            return None
        facts = TokenizerFacts.from_json(facts_path.read_text())
        if facts is None:
            return None
        return cls(_load_backend(folder / BACKEND_FILE), facts, load_hf)

    # -- the fast path ----------------------------------------------------------------------------

    @property
    def eos_token_id(self) -> int | None:
        return self.facts.eos_token_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self._hf_encode is not None:
            return self._hf_encode(text, add_special_tokens=add_special_tokens)
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    def max_token_chars(self) -> int:
        """The longest vocabulary entry, in characters (at least 1)."""
        if self.facts.max_token_chars is not None:
            return max(self.facts.max_token_chars, 1)
        return max(longest_token_chars(self.backend), 1)

    # -- transformers' part -----------------------------------------------------------------------

    @property
    def hf_tokenizer(self) -> Any:
        """transformers' tokenizer, loaded on first use (once, whichever thread asks)."""
        if self._hf_tokenizer is None:
            with self._lock:
                if self._hf_tokenizer is None:
                    assert self._load_hf is not None
                    self._hf_tokenizer = self._load_hf()
        return self._hf_tokenizer

    @property
    def is_hf_loaded(self) -> bool:
        return self._hf_tokenizer is not None

    def preload(self) -> None:
        """Load transformers' tokenizer on a thread of its own (once), if a chat template will
        need it: called when the engine is idle, so that no request waits for it."""
        if self.is_hf_loaded or self._is_preloading or not self.facts.has_chat_template:
            return
        self._is_preloading = True
        threading.Thread(target=self._preload, name="hf-tokenizer", daemon=True).start()

    def _preload(self) -> None:
        try:
            self.hf_tokenizer  # noqa: B018 - loads it
        except Exception:  # noqa: BLE001 - the first chat request tries again and reports it
            logger.exception("transformers' tokenizer did not load")


def longest_token_chars(backend: Any) -> int:
    """The longest entry of a `tokenizers.Tokenizer`'s vocabulary (added tokens included)."""
    return max(map(len, backend.get_vocab(with_added_tokens=True)), default=1)


def write_facts(hf_tokenizer: Any, folder: Path) -> bool:
    """Write the facts beside a saved tokenizer if its `tokenizer.json` encodes as transformers'
    tokenizer built from the folder does (else the engine loads transformers' tokenizer, as it
    must for this one); True if written."""
    backend_path = folder / BACKEND_FILE
    if not backend_path.exists():
        return False
    backend = _load_backend(backend_path)
    hf_backend = type(backend).from_str(hf_tokenizer.backend_tokenizer.to_str())
    hf_backend.no_truncation()
    hf_backend.no_padding()
    is_same = backend.to_str() == hf_backend.to_str() and all(
        backend.encode(text, add_special_tokens=add).ids
        == hf_tokenizer.encode(text, add_special_tokens=add)
        for text in _probe_texts(hf_tokenizer) for add in (True, False))
    if not is_same:
        logger.info("%s: transformers' tokenizer encodes otherwise than its %s; no %s", folder,
                    BACKEND_FILE, FACTS_FILE)
        return False
    (folder / FACTS_FILE).write_text(TokenizerFacts.of(hf_tokenizer).to_json())
    return True


def _load_backend(path: Path) -> Any:
    from tokenizers import Tokenizer as Backend

    backend = Backend.from_file(str(path))
    # As transformers sets them for a call that asks for neither.
    backend.no_truncation()
    backend.no_padding()
    return backend


def _probe_texts(hf_tokenizer: Any) -> list[str]:
    special = " ".join(str(t) for t in hf_tokenizer.all_special_tokens)
    return ["Hello world!", "  leading and trailing spaces  ", "café naïve 東京 🙂\n\ttab",
            special, f"a{special}b", "word " * 600, ""]
