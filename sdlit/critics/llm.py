"""What every LLM critic shares: the critique prompt, the reply parser, the reply cache, per-item failures.

A subclass only says how to get replies for a list of chat conversations (:meth:`LLMCritic.generate`);
this class renders the prompts, serves what it can from the on-disk cache, and parses the replies. A failure
on one item (a timeout, an HTTP error, an unparseable reply) is returned as that item's exception by
:meth:`LLMCritic.critique_outcomes`, so the other items of the batch keep their critiques.
"""

from __future__ import annotations

from typing import Any, Sequence

from sdlit.critics.base import Critique
from sdlit.critics.cache import ReplyCache, cache_key
from sdlit.critics.prompt import CritiqueParser, CritiquePrompt

__all__ = ["LLMCritic", "Messages"]

Messages = list[dict[str, str]]


class LLMCritic:
    """Base class of critics backed by a language model (see the module docstring).

    Args:
        prompt: The critique prompt (template with ``{question}``, ``{reference}``, ``{response}``; system
            message).
        parser: How the reply is read (thinking stripped, strictness, which part becomes the context).
        cache_dir: Folder of an on-disk cache of replies keyed by model, prompt and sampling settings; a
            rerun then asks the critic nothing. None: no cache.
    """

    def __init__(self, prompt: CritiquePrompt | None = None, parser: CritiqueParser | None = None,
                 cache_dir: str | None = None):
        self.prompt = prompt or CritiquePrompt()
        self.parser = parser or CritiqueParser()
        self.cache_dir = cache_dir
        self.cache = ReplyCache(cache_dir) if cache_dir else None

    # ---- to implement ------------------------------------------------------------------------------
    def generate(self, conversations: list[Messages]) -> list[str | Exception]:
        """One reply (or the exception that prevented it) per conversation, in order."""
        raise NotImplementedError

    def cache_inputs(self) -> dict[str, Any]:
        """Settings besides the messages that determine a reply (model, sampling); part of the cache key."""
        raise NotImplementedError

    # ---- the Critic protocol -----------------------------------------------------------------------
    def critique(self, question: str, reference: str, response: str) -> Critique:
        """Critique one response; raises the failure (request error, CritiqueParseError) if there is one."""
        return self.critique_batch([(question, reference, response)])[0]

    def critique_batch(self, items: Sequence[tuple[str, str, str]]) -> list[Critique]:
        """Critique many (question, reference, response) triples; raises the first failure."""
        outcomes = self.critique_outcomes(items)
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                raise outcome
        return outcomes

    def critique_outcomes(self, items: Sequence[tuple[str, str, str]]) -> list[Critique | Exception]:
        """A critique, or the exception that prevented it, per item: one failure spoils no other item."""
        replies = self.replies(items)
        outcomes: list[Critique | Exception] = []
        for (_, _, response), reply in zip(items, replies, strict=False):
            if isinstance(reply, Exception):
                outcomes.append(reply)
                continue
            try:
                outcomes.append(self.parser.parse(reply, response))
            except ValueError as err:  # CritiqueParseError, or a parser subclass's own
                outcomes.append(err)
        return outcomes

    def replies(self, items: Sequence[tuple[str, str, str]]) -> list[str | Exception]:
        """The critic's raw replies (cached ones first, then one generate() call for the rest)."""
        conversations = [self.prompt.messages(q, ref, resp) for q, ref, resp in items]
        settings = self.cache_inputs()
        keys = [cache_key({**settings, "messages": c}) for c in conversations]
        replies: list[str | Exception | None] = [self.cache.get(k) if self.cache else None for k in keys]
        todo = [i for i, r in enumerate(replies) if r is None]
        if todo:
            for i, reply in zip(todo, self.generate([conversations[i] for i in todo]), strict=False):
                replies[i] = reply
                if self.cache is not None and isinstance(reply, str):
                    self.cache.put(keys[i], reply, {"model": settings.get("model")})
        return replies  # type: ignore[return-value]
