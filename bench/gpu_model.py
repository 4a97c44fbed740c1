"""A random-weight causal LM of real shapes plus a tokenizer, built locally and saved for ``from_pretrained``.

The GPU machine has no network and no pretrained weights; timings and kernel checks do not need trained weights.
``qwen3-1.7b`` is Qwen3-1.7B's configuration (hidden 2048, 28 layers, 16 heads, 8 KV heads, vocabulary 151936, tied
embeddings) with random weights; ``tiny`` is a 2-layer Qwen3 of the same kind for CPU dry runs.

The tokenizer is a byte-level BPE (lossless on any text, like ``tests/conftest.py``'s ``build_tokenizer``) whose merges
are learnt here from the vendored GSM8K problems, so that prompts have about the token counts of a real tokenizer;
its vocabulary is filled up to the model's with tokens that no text encodes to, so that every id the random model
samples decodes to text. ChatML template, EOS ``<|im_end|>``.

    python bench/gpu_model.py --out /tmp/qwen3-random            # Qwen3-1.7B shapes (on CUDA when available)
    python bench/gpu_model.py --out /tmp/tiny --shape tiny
"""

from __future__ import annotations

import argparse
import time

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SHAPES = {
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=2048, max_position_embeddings=4096),
}
LEARNT_VOCAB = {"qwen3-1.7b": 8192, "tiny": 1024}  # BPE vocabulary learnt from GSM8K (the rest: filler tokens)


def gsm8k_texts() -> list[str]:
    """Questions and solutions of the vendored GSM8K problems: the tokenizer's training text."""
    from sdlit.tasks.gsm8k import GSM8K

    task = GSM8K()
    problems = task.train_problems() + task.eval_problems()
    return [text for p in problems for text in (p.question, p.solution)]


def build_tokenizer(vocab_size: int, learnt: int):
    """A byte-level BPE tokenizer with merges learnt from GSM8K and exactly ``vocab_size`` ids."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=learnt, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(gsm8k_texts(), trainer)
    trained = json.loads(core.to_str())["model"]
    vocab = dict(trained["vocab"])
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    for index in range(len(vocab), vocab_size):  # ids the model may sample; no text encodes to them
        vocab[f"<|filler_{index}|>"] = index
    full = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    full.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    full.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=full, bos_token=SPECIALS[0], eos_token=SPECIALS[2],
                                        pad_token=SPECIALS[0], additional_special_tokens=[SPECIALS[1]])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_config(shape: str, tokenizer):
    """transformers' Qwen3Config of ``shape``, with the tokenizer's special ids."""
    from transformers import Qwen3Config

    return Qwen3Config(
        **SHAPES[shape], hidden_act="silu", rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, attention_bias=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def build(out: str, shape: str = "qwen3-1.7b", device: str | None = None, seed: int = 0) -> dict:
    """Build the tokenizer and the random model, save both to ``out``; returns what was built."""
    from transformers import Qwen3ForCausalLM

    start = time.perf_counter()
    vocab_size = SHAPES[shape]["vocab_size"]
    tokenizer = build_tokenizer(vocab_size, LEARNT_VOCAB[shape])
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen3ForCausalLM(build_config(shape, tokenizer)).to(torch.bfloat16)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"dir": out, "shape": shape, "parameters": sum(p.numel() for p in model.parameters()),
            "vocab_size": vocab_size, "tokenizer_ids": len(tokenizer), "device": device,
            "seconds": time.perf_counter() - start}


def main(argv=None) -> None:
    """Build and save; prints one ``RESULT {json}`` line."""
    import json

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory to save the model and tokenizer to")
    p.add_argument("--shape", choices=list(SHAPES), default="qwen3-1.7b")
    p.add_argument("--device", default=None, help="where to initialise the weights (default: cuda when available)")
    args = p.parse_args(argv)
    print("RESULT " + json.dumps(build(args.out, args.shape, args.device)), flush=True)


if __name__ == "__main__":
    main()
