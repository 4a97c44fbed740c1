"""HFCritic: a frozen transformers model as the critic, on its own device and dtype, greedy and batched."""

from __future__ import annotations

import logging
from typing import Any

import torch

from sdlit.critics.llm import LLMCritic, Messages
from sdlit.critics.prompt import CritiqueParser, CritiquePrompt

__all__ = ["HFCritic"]

log = logging.getLogger(__name__)


class HFCritic(LLMCritic):
    """A frozen Hugging Face causal LM that writes the step-aligned critiques (loaded on first use).

    Greedy decoding, no gradient, eval mode, autocast off (the critic keeps its own dtype even inside a
    bf16-mixed training step). Conversations go through the model's chat template when it has one.

    Args:
        model: Packaged alias (``smollm2-135m-instruct``), local model directory or Hugging Face model id.
        device: Where the critic runs, e.g. ``cuda:1`` to keep it off the solver's GPU; ``auto``: the first
            GPU when there is one, else the CPU.
        dtype: Weight dtype, e.g. ``bfloat16``; default fp32.
        max_new_tokens: Longest reply in tokens (a thinking critic needs thousands).
        batch_size: Conversations generated together.
        template_kwargs: Extra chat-template arguments, e.g. ``{enable_thinking: true}``.
        attn_implementation: Attention kernel; default flash-attn on CUDA when installed, else ``sdpa``.
        trust_remote_code: Allow models whose code lives in their repository.
        prompt: The critique prompt (see ``sdlit.critics.prompt``).
        parser: How the reply is read.
        cache_dir: On-disk cache of replies (None: no cache).
    """

    def __init__(
        self,
        model: str = "smollm2-135m-instruct",
        device: str = "auto",
        dtype: str | None = None,
        max_new_tokens: int = 1024,
        batch_size: int = 8,
        template_kwargs: dict | None = None,
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
        prompt: CritiquePrompt = CritiquePrompt(),
        parser: CritiqueParser = CritiqueParser(),
        cache_dir: str | None = None,
    ):
        super().__init__(prompt, parser, cache_dir)
        if batch_size < 1 or max_new_tokens < 1:
            raise ValueError(f"HFCritic: batch_size and max_new_tokens must be at least 1, "
                             f"got {batch_size} and {max_new_tokens}")
        self.model_name = model
        self.device = device
        self.dtype = dtype
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.template_kwargs = template_kwargs or {}
        self.attn_implementation = attn_implementation
        self.trust_remote_code = trust_remote_code
        self._model = None
        self._tokenizer = None

    def cache_inputs(self) -> dict[str, Any]:
        return {"backend": "hf", "model": self.model_name, "dtype": self.dtype, "greedy": True,
                "max_new_tokens": self.max_new_tokens, "template_kwargs": self.template_kwargs}

    def load(self) -> None:
        """Load the frozen model and its tokenizer (once)."""
        if self._model is not None:
            return
        from sdlit.models import load_model, load_tokenizer

        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        log.info("loading critic %s on %s (%s)", self.model_name, device, self.dtype or "float32")
        tokenizer = load_tokenizer(self.model_name, trust_remote_code=self.trust_remote_code)
        model = load_model(self.model_name, self.dtype, self.attn_implementation, self.trust_remote_code)
        model.to(device).eval().requires_grad_(False)
        self._model, self._tokenizer = model, tokenizer

    def render(self, conversation: Messages) -> str:
        """The prompt text of a conversation (chat template with generation prompt, or a plain layout)."""
        tokenizer = self._tokenizer
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True,
                                                 **self.template_kwargs)
        return "\n\n".join(m["content"] for m in conversation) + "\n\n"

    def generate(self, conversations: list[Messages]) -> list[str | Exception]:
        """Greedy replies, ``batch_size`` at a time; a failing batch gives its items the exception."""
        self.load()
        replies: list[str | Exception] = []
        for start in range(0, len(conversations), self.batch_size):
            chunk = conversations[start: start + self.batch_size]
            try:
                replies += self._generate_chunk(chunk)
            except (RuntimeError, ValueError) as err:  # e.g. out of memory, a template error
                log.warning("HFCritic failed on %d conversations: %s: %s", len(chunk), type(err).__name__, err)
                replies += [err] * len(chunk)
        return replies

    @torch.inference_mode()
    def _generate_chunk(self, chunk: list[Messages]) -> list[str]:
        model, tokenizer = self._model, self._tokenizer
        texts = [self.render(c) for c in chunk]
        add_special = not getattr(tokenizer, "chat_template", None)
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=add_special)
        batch = batch.to(model.device)
        with torch.autocast(device_type=model.device.type, enabled=False):
            out = model.generate(
                **batch,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                max_new_tokens=self.max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
            )
        new_tokens = out[:, batch["input_ids"].shape[1]:]
        return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
