"""HTTPCritic: a critic behind any OpenAI-compatible chat-completions endpoint (vLLM, SGLang, a hosted API).

Requests run in a thread pool of ``concurrency`` workers. Timeouts, connection errors, 5xx and 429 answers
are retried with exponential backoff; other 4xx answers are not (the request itself is wrong). The API key
is read from the environment variable named by ``api_key_env`` when a request is sent: only the variable's
name is a setting, so the key never reaches the saved config, hyperparameters, logs or checkpoints, and it
is redacted from every error message.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests

from sdlit.critics.llm import LLMCritic, Messages
from sdlit.critics.prompt import CritiqueParser, CritiquePrompt

__all__ = ["CriticHTTPError", "CriticReplyError", "HTTPCritic"]

log = logging.getLogger(__name__)


class CriticHTTPError(RuntimeError):
    """The endpoint could not be reached or kept failing (timeouts, connection errors, HTTP errors)."""


class CriticReplyError(ValueError):
    """The endpoint answered 200 with a body that is not a chat completion (malformed JSON, no content)."""


class _Retryable(Exception):
    """A failure worth another attempt (timeout, connection error, 5xx, 429), with the server's wait hint."""

    def __init__(self, message: str, wait: float | None = None):
        super().__init__(message)
        self.wait = wait


class HTTPCritic(LLMCritic):
    """A frozen LLM critic served over HTTP with the OpenAI chat-completions API.

    Args:
        base_url: Endpoint root; requests go to ``{base_url}/chat/completions``
            (e.g. ``http://localhost:8000/v1`` for ``vllm serve``).
        model: Model name the server knows (e.g. ``Qwen/QwQ-32B``).
        api_key_env: Name of the environment variable holding the API key, read at request time and sent
            as ``Authorization: Bearer ...`` when set. The key itself is never a setting. None: no key.
        timeout: Seconds to wait for one reply (a thinking critic may need minutes).
        max_retries: Further attempts after a timeout, connection error, 5xx or 429 answer.
        backoff: Seconds before the first retry; doubled on each further retry.
        max_backoff: Longest wait between two attempts, in seconds.
        concurrency: Requests in flight at the same time.
        temperature: Sampling temperature (0: greedy, the paper's setting).
        max_tokens: Longest reply in tokens.
        extra_body: Further request fields, e.g. ``{chat_template_kwargs: {enable_thinking: true}}`` or
            ``{seed: 0}``; they are part of the cache key.
        prompt: The critique prompt (see ``sdlit.critics.prompt``).
        parser: How the reply is read.
        cache_dir: On-disk cache of replies keyed by model, prompt and sampling settings (None: no cache).
    """

    def __init__(
        self,
        base_url: str = "http://localhost:8000/v1",
        model: str = "Qwen/QwQ-32B",
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout: float = 600.0,
        max_retries: int = 3,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        concurrency: int = 8,
        temperature: float = 0.0,
        max_tokens: int = 8192,
        extra_body: dict | None = None,
        prompt: CritiquePrompt = CritiquePrompt(),
        parser: CritiqueParser = CritiqueParser(),
        cache_dir: str | None = None,
    ):
        super().__init__(prompt, parser, cache_dir)
        if concurrency < 1 or max_retries < 0 or timeout <= 0:
            raise ValueError(f"HTTPCritic: concurrency >= 1, max_retries >= 0 and timeout > 0 are needed, got "
                             f"{concurrency}, {max_retries} and {timeout}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.concurrency = concurrency
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.extra_body = extra_body or {}

    @property
    def url(self) -> str:
        """The chat-completions URL."""
        return f"{self.base_url}/chat/completions"

    def cache_inputs(self) -> dict[str, Any]:
        return {"backend": "openai-chat", "model": self.model, "temperature": self.temperature,
                "max_tokens": self.max_tokens, "extra_body": self.extra_body}

    def generate(self, conversations: list[Messages]) -> list[str | Exception]:
        """Replies from the endpoint, at most ``concurrency`` requests at a time; failures as exceptions."""
        if not conversations:
            return []
        workers = min(self.concurrency, len(conversations))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sdlit-critic") as pool:
            return list(pool.map(self._reply_or_error, conversations))

    def _reply_or_error(self, conversation: Messages) -> str | Exception:
        try:
            return self.complete(conversation)
        except (CriticHTTPError, CriticReplyError) as err:
            return err

    def complete(self, conversation: Messages) -> str:
        """One chat completion with retries; raises CriticHTTPError or CriticReplyError (key redacted)."""
        body = {"model": self.model, "messages": conversation, "temperature": self.temperature,
                "max_tokens": self.max_tokens, **self.extra_body}
        for attempt in range(self.max_retries + 1):
            try:
                return self._attempt(body)
            except _Retryable as failure:
                if attempt == self.max_retries:
                    raise CriticHTTPError(self._redact(
                        f"critic request to {self.url} failed after {attempt + 1} attempt(s): {failure}")) from None
                delay = min(self.max_backoff, max(failure.wait or 0.0, self.backoff * 2**attempt))
                log.info("critic request failed (%s); retry %d/%d in %.2fs",
                         self._redact(str(failure)), attempt + 1, self.max_retries, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _attempt(self, body: dict) -> str:
        """One request: the reply; _Retryable when worth another try; CriticHTTPError when not."""
        try:
            answer = requests.post(self.url, json=body, headers=self._headers(), timeout=self.timeout)
        except requests.Timeout:
            raise _Retryable(f"no reply within {self.timeout}s") from None
        except requests.ConnectionError as err:
            raise _Retryable(f"connection failed ({type(err).__name__})") from None
        except requests.RequestException as err:
            raise CriticHTTPError(self._redact(f"critic request to {self.url} failed: {err}")) from None
        if answer.status_code == 429 or answer.status_code >= 500:
            raise _Retryable(f"HTTP {answer.status_code}: {answer.text[:200]}", _retry_after(answer))
        if answer.status_code >= 400:
            raise CriticHTTPError(self._redact(
                f"critic request to {self.url} was refused: HTTP {answer.status_code}: {answer.text[:300]}"))
        return self._content(answer)

    def _content(self, answer: requests.Response) -> str:
        """The reply text of a chat-completion body; CriticReplyError when the body is not one."""
        try:
            content = answer.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as err:
            raise CriticReplyError(self._redact(
                f"critic at {self.url} sent a body that is no chat completion ({type(err).__name__}): "
                f"{answer.text[:200]!r}")) from None
        if not isinstance(content, str):
            raise CriticReplyError(f"critic at {self.url} sent no message content (got {type(content).__name__})")
        return content

    def _headers(self) -> dict[str, str]:
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _redact(self, text: str) -> str:
        """``text`` with the API key (if any is set) replaced by ``***``."""
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        return text.replace(key, "***") if key else text

    def __repr__(self) -> str:
        return f"HTTPCritic(base_url={self.base_url!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"


def _retry_after(answer: requests.Response) -> float | None:
    """Seconds asked for by a Retry-After header (numeric form only)."""
    try:
        return float(answer.headers.get("Retry-After", ""))
    except ValueError:
        return None
