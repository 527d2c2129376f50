"""The ``hf`` tokenizer: a transformers tokenizer behind FlowServe's ``Tokenizer`` Protocol."""

from __future__ import annotations

import json
import logging
import re
from functools import partial
from pathlib import Path
from typing import Any, Mapping, Sequence

import msgspec

from flowserve_core.config import default_model_path
from flowserve_core.errors import ConfigError
from flowserve_core.interfaces import ChatMessage
from flowserve_core.types import DeploymentSpec, SamplingParams
from flowserve_hf_tokenizer.detokenizer import REPLACEMENT_CHARACTER, DecodeFn, HFDetokenizer
from flowserve_hf_tokenizer.loading import LoadedTokenizer, load_tokenizer

logger = logging.getLogger(__name__)

_BYTE_FALLBACK_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class HFTokenizer:
    """Text ↔ token ids, chat template, EOS ids and streaming detokenizers for one model.

    Built from ``load_tokenizer`` (a model directory, a GGUF file or a local Hub snapshot).
    Deployment options: ``chat_template`` = a Jinja template file (or the template text) to
    use instead of the model's own; ``special_tokens_in_messages`` = true lets control tokens
    written in message content (``<|im_start|>``…) act as control tokens again, the old
    behaviour, with which any client can forge turns (off by default).
    """

    def __init__(self, loaded: LoadedTokenizer, spec: DeploymentSpec | None = None):
        spec = spec or DeploymentSpec()
        hf = loaded.tokenizer
        self.hf_tokenizer = hf
        self.model = loaded.model
        tokenizer_eos = [hf.eos_token_id] if isinstance(hf.eos_token_id, int) else []
        self.eos_token_ids: list[int] = list(dict.fromkeys(tokenizer_eos + loaded.facts.eos_token_ids))
        if not self.eos_token_ids:
            logger.warning("model %s names no end-of-sequence token; generation stops only at "
                           "max_tokens or a stop string", self.model)
        self.vocab_size: int = len(hf)
        self.max_model_len: int | None = spec.max_model_len or loaded.facts.context_length
        self.chat_template: str | None = _chat_template_option(spec) or getattr(hf, "chat_template", None)
        #: Whether control tokens inside message content stay control tokens (issue 20: off,
        #: so that only the chat template's own markup yields them).
        self.special_tokens_in_messages = _bool_option(spec, "special_tokens_in_messages")
        backend = getattr(hf, "backend_tokenizer", None)
        # The Rust tokenizer's own decode: what transformers' decode calls, minus its
        # ``clean_up_tokenization_spaces`` pass, which is not stable under streaming.
        self._decode: DecodeFn = backend.decode if backend is not None else partial(_slow_decode, hf)
        self._backend = backend
        self._decoder_types = _decoder_types(backend)
        self._token_texts: dict[int, str] = {}
        # A token is shown as it reads mid-text, after this anchor: SentencePiece decoders
        # drop a leading space at the start of a decode, but OpenAI shows " Hello".
        self._anchor_ids = list(hf.encode("a", add_special_tokens=False))
        self._anchor_text = self._decode(self._anchor_ids, False)

    # ------------------------------------------------------------------ text ↔ ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` adds BOS/EOS as the model wants."""
        return list(self.hf_tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``token_ids`` (the same decoding the streaming detokenizer does)."""
        return self._decode(list(token_ids), skip_special_tokens)

    def detokenizer(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> HFDetokenizer:
        """A streaming detokenizer for one output sequence continuing ``prompt_token_ids``."""
        return HFDetokenizer(self._decode, prompt_token_ids, params, self.eos_token_ids)

    # ------------------------------------------------------------------ chat

    def apply_tool_chat_template(self, messages: Sequence[Mapping[str, Any]],
                                 tools: Sequence[Mapping[str, Any]] | None) -> list[int]:
        """A chat with tool definitions and tool turns (``RendersTools``): ``tools`` reach the
        template as transformers' ``tools`` argument, assistant ``tool_calls`` and ``tool`` turns
        as the messages hold them; otherwise as ``apply_chat_template``."""
        return self.apply_chat_template(messages, tools=tools)

    def tool_call_markup(self) -> str | None:
        """The chat template in use, whose markup tells which tool-call parser reads this model."""
        return self.chat_template

    def apply_chat_template(self, messages: Sequence[ChatMessage | Mapping[str, Any]],
                            add_generation_prompt: bool = True,
                            tools: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
        """Token ids of ``messages`` rendered with the model's chat template; with
        ``add_generation_prompt`` they end where the assistant's reply begins.

        Text inside the messages is tokenized as text: a control token written in a message
        (``<|im_end|>``) becomes the tokens of its characters, never the control token, so a
        client cannot forge a turn; only the template's own markup yields control tokens
        (transformers' ``sanitize_control_tokens``). The deployment option
        ``special_tokens_in_messages`` turns that off.

        Raises ``ValueError`` when the model has no chat template or the template refuses
        the conversation (e.g. roles that do not alternate).
        """
        if not self.chat_template:
            raise ValueError(
                f"model {self.model} has no chat template, so chat messages cannot be turned into a "
                "prompt; use the completions API, or set the deployment option chat_template to a "
                "Jinja template file")
        if not messages:
            raise ValueError("a chat needs at least one message, got none")
        conversation = [_message_dict(m) for m in messages]
        from jinja2 import TemplateError

        try:
            rendered = self.hf_tokenizer.apply_chat_template(
                conversation, chat_template=self.chat_template, add_generation_prompt=add_generation_prompt,
                tools=list(tools) if tools else None, tokenize=True, return_dict=False, sanitize_control_tokens=not self.special_tokens_in_messages)
        except TemplateError as exc:
            raise ValueError(f"the chat template of {self.model} refused the messages: {exc}") from exc
        return list(rendered["input_ids"] if isinstance(rendered, Mapping) else rendered)

    # ------------------------------------------------------------------ logprobs

    def token_text(self, token_id: int) -> str:
        """The text of one token as OpenAI's logprobs show it: the token decoded alone
        (special tokens included), or ``bytes:\\xe4\\xb8`` when it is part of a character."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._decode_mid_text(token_id)
            if REPLACEMENT_CHARACTER in text:
                raw = self.token_bytes(token_id)
                if REPLACEMENT_CHARACTER in raw.decode("utf-8", errors="replace"):
                    text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            self._token_texts[token_id] = text
        return text

    def token_bytes(self, token_id: int) -> bytes:
        """The UTF-8 bytes one token stands for (OpenAI's ``bytes`` field), partial
        characters included. Optional extension of the ``Tokenizer`` Protocol."""
        text = self._decode_mid_text(token_id)
        if REPLACEMENT_CHARACTER not in text:
            return text.encode()
        piece = self._backend.id_to_token(token_id) if self._backend is not None else \
            self.hf_tokenizer.convert_ids_to_tokens(token_id)
        if piece is None:
            return b""
        if "ByteLevel" in self._decoder_types and all(c in _BYTE_LEVEL_DECODER for c in piece):
            return bytes(_BYTE_LEVEL_DECODER[c] for c in piece)
        byte = _BYTE_FALLBACK_PIECE.fullmatch(piece)
        if byte and "ByteFallback" in self._decoder_types:
            return bytes([int(byte.group(1), 16)])
        return text.encode()


    def _decode_mid_text(self, token_id: int) -> str:
        """One token's text as it reads after other text (special tokens shown)."""
        anchor = self._anchor_text
        if anchor and anchor[-1] != REPLACEMENT_CHARACTER:
            text = self._decode([*self._anchor_ids, token_id], False)
            if text.startswith(anchor):
                return text[len(anchor):]
        return self._decode([token_id], False)


def _slow_decode(hf: Any, token_ids: Sequence[int], skip_special_tokens: bool) -> str:
    return hf.decode(list(token_ids), skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)


def _message_dict(message: ChatMessage | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(message, msgspec.Struct):
        return msgspec.structs.asdict(message)
    if isinstance(message, Mapping):
        return dict(message)
    raise TypeError(f"a chat message must be a ChatMessage or a mapping, got {type(message).__name__}")


def _bool_option(spec: DeploymentSpec, name: str) -> bool:
    value = spec.options.get(name, False)
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    if isinstance(value, bool) or value in (0, 1):
        return bool(value)
    raise ConfigError(f"deployment option {name}={value!r}: give true or false")


def _chat_template_option(spec: DeploymentSpec) -> str | None:
    value = spec.options.get("chat_template")
    if not value:
        return None
    value = str(value)
    if "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    try:
        return path.read_text()
    except OSError as exc:
        raise ValueError(f"deployment option chat_template={value!r}: cannot read the template "
                         f"file ({exc.strerror or exc})") from None


def _decoder_types(backend: Any) -> set[str]:
    """The ``type`` names in a tokenizers decoder (nested sequences included)."""
    decoder = getattr(backend, "decoder", None)
    if decoder is None:
        return set()
    found: set[str] = set()
    stack = [json.loads(decoder.__getstate__())]
    while stack:
        node = stack.pop()
        found.add(node.get("type", ""))
        stack.extend(node.get("decoders") or [])
    return found


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: printable stand-in character → byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(char): byte for byte, char in zip(printable, chars)}


_BYTE_LEVEL_DECODER = _byte_level_decoder()


def build_hf_tokenizer(spec: DeploymentSpec) -> HFTokenizer:
    """The ``hf`` tokenizer factory: load ``spec.model`` (default: SmolLM2's GGUF)."""
    return HFTokenizer(load_tokenizer(spec.model or default_model_path()), spec)
