"""The TRL side of the training-step throughput benchmark: N optimizer steps of sdlit's work done by TRL.

Runs in its own process, loads the packaged SmolLM2-135M-Instruct (or ``--model DIR``) with a LoRA adapter,
trains ``--steps`` optimizer steps on the first ``--prompts * --steps`` vendored GSM8K training problems with one
of TRL's trainers, and prints one line ``RESULT {json}`` on stdout at the end (logs may come before it):

    python bench/trl_peer.py --condition reference --steps 2 --prompts 8 --max-new-tokens 128
    python bench/trl_peer.py --condition grpo --steps 2 --prompts 8 --max-new-tokens 128

``reference``: self-distillation whose teacher (the initial policy: LoRA adapter off) also sees the reference
solution, via ``trl.experimental.sdft.SDFTTrainer`` (one rollout per prompt, full-vocabulary KL(teacher||student)).
``grpo``: ``trl.GRPOTrainer`` with 8 rollouts per prompt and a 0/1 correctness reward (sdlit's answer check).

Step times come from a TrainerCallback (on_step_begin .. on_step_end), so model loading and trainer
construction are excluded; the first step may include warm-up. Generation time and generated tokens per step
come from a wrapper around the model's ``generate``. On a GPU (``--accelerator gpu``: bf16 autocast) the result also
has the process's peak GPU memory (``torch.cuda.max_memory_allocated``). Needs ``pip install -e '.[bench]'``
(trl==1.16.0).
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
import transformers
import trl
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from sdlit.callbacks.feedback import ReferenceSolution
from sdlit.models import resolve_model_path
from sdlit.prompts import student_message, student_prompt_ids, teacher_message, teacher_prompt_ids
from sdlit.tasks.answers import is_correct
from sdlit.tasks.gsm8k import GSM8K
from sdlit.tasks.solutions import clean_solution

MODEL = "smollm2-135m-instruct"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GRPO_GENERATIONS = 8
HEADER = ReferenceSolution().header  # sdlit's line introducing the reference solution to the teacher


class StepMeter(TrainerCallback):
    """Wall time of each optimizer step, plus generate() time and generated tokens inside that step."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.generation_seconds: list[float] = []
        self.completion_tokens: list[int] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self.generation_seconds.append(0.0)
        self.completion_tokens.append(0)
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._start)

    def wrap_generate(self, model, eos_ids: list[int]) -> None:
        """Replace ``model.generate`` (on the instance) by a timed one that counts tokens up to the first EOS."""
        original = model.generate
        eos = torch.tensor(eos_ids)

        def timed_generate(*args, **kwargs):
            start = time.perf_counter()
            out = original(*args, **kwargs)
            if self.generation_seconds:  # generate calls outside a step (none expected) are not counted
                self.generation_seconds[-1] += time.perf_counter() - start
                prompt_width = kwargs["input_ids"].shape[1] if "input_ids" in kwargs else args[0].shape[1]
                self.completion_tokens[-1] += count_until_eos(out[:, prompt_width:].cpu(), eos)
            return out

        model.generate = timed_generate


def count_until_eos(completions: torch.Tensor, eos: torch.Tensor) -> int:
    """Generated tokens of a [B, T] batch, each row counted up to and including its first EOS."""
    is_eos = torch.isin(completions, eos)
    width = completions.shape[1]
    lengths = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, torch.full((len(completions),), width))
    return int(lengths.sum())


def teacher_template() -> str:
    """TRL's teacher_prompt_template that renders exactly sdlit's teacher message (built from sdlit's own text)."""
    question, context = "\x00QUESTION\x00", "\x00CONTEXT\x00"
    text = teacher_message(question, context, HEADER).replace("{", "{{").replace("}", "}}")
    return text.replace(student_message(question), "{prompt}", 1).replace(context, "{privileged_context}", 1)


def build_dataset(n: int) -> Dataset:
    """The first ``n`` GSM8K training problems as conversational prompts with context and gold answer columns."""
    problems = GSM8K().train_problems()[:n]
    if len(problems) < n:
        raise SystemExit(f"only {len(problems)} vendored GSM8K training problems, {n} asked for")
    return Dataset.from_list([
        {
            "prompt": [{"role": "user", "content": student_message(p.question)}],
            "privileged_context": clean_solution(p.solution),  # what sdlit's ReferenceSolution feedback sets
            "answer": p.answer,
            "question": p.question,
        }
        for p in problems
    ])


def correctness_reward(completions, answer, **kwargs) -> list[float]:
    """1.0 when sdlit's answer check accepts the completion, else 0.0."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [1.0 if is_correct(text, gold) else 0.0 for text, gold in zip(texts, answer, strict=False)]


def common_args(opts) -> dict:
    """Trainer settings shared by both conditions."""
    return dict(
        output_dir="/tmp/sdlit-trl-peer", max_steps=opts.steps, learning_rate=opts.lr, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=opts.max_grad_norm, logging_steps=1, report_to="none",
        save_strategy="no", bf16=opts.accelerator == "gpu", fp16=False, use_cpu=opts.accelerator == "cpu",
        dataloader_num_workers=0, seed=opts.seed,
        disable_tqdm=True, max_completion_length=opts.max_new_tokens, temperature=opts.temperature, top_p=1.0,
        top_k=0, shuffle_dataset=False, gradient_accumulation_steps=1, num_iterations=1,
    )


def make_trainer(opts, model, tokenizer, dataset, meter):
    """The TRL trainer of ``opts.condition`` with sdlit's LoRA settings."""
    lora = LoraConfig(r=opts.lora_r, lora_alpha=opts.lora_alpha, lora_dropout=0.0, target_modules=LORA_TARGETS,
                      task_type="CAUSAL_LM")
    if opts.condition == "reference":
        from trl.experimental.sdft import SDFTConfig, SDFTTrainer

        args = SDFTConfig(
            **common_args(opts), per_device_train_batch_size=opts.prompts, num_generations=1,
            teacher_model_kind="base", distillation_mode="full_logits",
            distillation_alpha=0.0,  # compute_divergence(alpha=0): kl_div(student, teacher) = KL(teacher || student)
            distillation_is_clip=None, num_loss_tokens_to_skip=0, max_prompt_length=None,
            teacher_prompt_template=teacher_template(), gradient_checkpointing=False,
        )
        return SDFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                           callbacks=[meter], peft_config=lora)
    args = trl.GRPOConfig(
        **common_args(opts), per_device_train_batch_size=opts.prompts * GRPO_GENERATIONS,
        num_generations=GRPO_GENERATIONS, steps_per_generation=1, beta=0.0, epsilon=0.2, scale_rewards="group",
        loss_type="bnpo",  # sum over the batch's masked tokens / their count, as sdlit (1 process, no accumulation)
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    return trl.GRPOTrainer(model=model, reward_funcs=correctness_reward, args=args, train_dataset=dataset,
                           processing_class=tokenizer, callbacks=[meter], peft_config=lora)


def prompt_check(trainer, tokenizer, dataset, condition: str) -> dict:
    """Whether TRL's own prompt tokenization gives sdlit's token ids (student, and teacher for ``reference``)."""
    rows = list(dataset)
    trl_student = tokenizer.apply_chat_template(  # the call both trainers make for conversational prompts
        conversation=[r["prompt"] for r in rows], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    ours = [student_prompt_ids(tokenizer, r["question"]) for r in rows]
    check = {"student_prompt_ids_equal": [list(a) == b for a, b in zip(trl_student, ours, strict=False)]}
    if condition == "reference":
        builder = trainer.teacher_context_builder
        teacher = trainer._tokenize_prompts(
            [builder._compose_teacher_prompt(r["prompt"], r["privileged_context"]) for r in rows])
        ours = [teacher_prompt_ids(tokenizer, r["question"], r["privileged_context"], HEADER, 10**9).ids for r in rows]
        check["teacher_prompt_ids_equal"] = [list(a) == b for a, b in zip(teacher, ours, strict=False)]
        check["teacher_prompt_tokens_max"] = max(len(t) for t in teacher)
    return check


DIFFERENCES = {
    "common": [
        "TRL keeps the model in train mode during generate() (sdlit switches to eval); dropout is off in both",
        "TRL's scoring forwards pass no position_ids: a left-padded row's positions start at its pad count "
        "(RoPE is relative, so only rounding differs); sdlit passes mask-derived position_ids",
        "TRL re-renders and re-tokenizes every prompt with apply_chat_template(tokenize=True) each step",
        "step time includes TRL's own per-step bookkeeping (completion decoding, metric gathering, logging)",
        "optimizer: transformers' default optim adamw_torch_fused (torch AdamW, fused=True), betas (0.9, 0.999), "
        "eps 1e-8, no weight decay; sdlit builds torch.optim.AdamW with torch's defaults",
    ],
    "reference": [
        "loss normalisation: TRL SDFT averages the per-token KL over each completion's tokens, then over "
        "completions (sequence mean); sdlit averages over all response tokens of the optimizer step (token mean, "
        "model.loss_normalization: tokens; 'sequences' is TRL SDFT's)",
        "TRL materialises full [B, T, V] fp32 logits for student and teacher and uses log_softmax + F.kl_div "
        "(no fused or chunked divergence)",
        "TRL divides student and teacher logits by the sampling temperature before the KL (sdlit: "
        "distill_temperature); identical at temperature 1.0",
        "teacher prompt: TRL fills teacher_prompt_template (sdlit's teacher message with header '" + HEADER
        + "') into the last user turn, renders the chat template and tokenizes the whole text; sdlit tokenizes "
        "the pieces around the context separately and may cut the context to a budget; TRL never cuts it "
        "(max_prompt_length=None); see prompt_check for token-id equality",
        "privileged_context is clean_solution(problem.solution): <<a*b=c>> annotations removed, as sdlit's "
        "ReferenceSolution feedback does",
        "teacher forward: same PeftModel under use_adapter(model, None) (adapter disabled), no_grad, one batch",
    ],
    "grpo": [
        "TRL GRPOTrainer used (not SDPO with distillation_weight=0): it is the maintained GRPO path and loads "
        "no teacher machinery",
        "TRL repeats each prompt 8 times in the generate batch and prefills all 64 rows; sdlit prefills each prompt "
        "once and repeats its KV cache (sdlit.sampling.static_cache)",
        "TRL scores completions with its tiled fused LM head (per-token log-probs and entropy, no [B, T, V] "
        "logits); sdlit materialises the response logits",
        "on CPU (no Triton) that fused head projects EVERY position of prompt+completion through the LM head "
        "and masks afterwards (compact=False in trl.trainer.utils.add_fused_lm_head); on CUDA only completion "
        "positions are projected",
        "TRL turns gradient checkpointing off around generate() and back on for the loss forward",
        "old log-probs: TRL uses the detached current log-probs (no extra forward), as sdlit on-policy",
        "reward: TRL decodes completions (skip_special_tokens) and calls sdlit's is_correct against the gold answer",
    ],
}


def main() -> None:
    """Parse the options, train, and print the RESULT line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--condition", choices=["reference", "grpo"], required=True)
    p.add_argument("--model", default=MODEL, help="packaged alias or a local model directory with its tokenizer")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--prompts", type=int, default=8, help="distinct problems per optimizer step")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--max-grad-norm", type=float, default=0.0, help="0 disables clipping (Lightning's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--accelerator", choices=["cpu", "gpu"], default="cpu", help="gpu: CUDA with bf16 mixed precision")
    opts = p.parse_args()

    if opts.threads > 0:
        torch.set_num_threads(opts.threads)
    transformers.set_seed(opts.seed)
    path = resolve_model_path(opts.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    dataset = build_dataset(opts.prompts * opts.steps)
    meter = StepMeter()
    trainer = make_trainer(opts, model, tokenizer, dataset, meter)
    eos_ids = getattr(trainer, "eos_token_ids", None) or [tokenizer.eos_token_id]
    meter.wrap_generate(trainer.model, list(eos_ids))
    check = prompt_check(trainer, tokenizer, dataset, opts.condition)

    trainer.train()

    a = trainer.args
    keys = ["per_device_train_batch_size", "gradient_accumulation_steps", "steps_per_generation", "num_generations",
            "max_completion_length", "max_prompt_length", "temperature", "top_p", "top_k", "learning_rate",
            "lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm", "optim", "seed",
            "gradient_checkpointing", "gradient_checkpointing_kwargs", "beta", "epsilon", "epsilon_high",
            "scale_rewards", "loss_type", "teacher_model_kind", "distillation_mode", "distillation_alpha",
            "distillation_is_clip", "num_loss_tokens_to_skip", "teacher_prompt_template", "shuffle_dataset"]
    config = {k: getattr(a, k) for k in keys if hasattr(a, k)}
    config["optim"] = str(config.get("optim"))
    config.update(
        model=opts.model, model_path=path, dtype="float32", attn_implementation="sdpa", lora_r=opts.lora_r,
        lora_alpha=opts.lora_alpha, lora_dropout=0.0, lora_targets=LORA_TARGETS, prompts_per_step=opts.prompts,
        torch_threads=torch.get_num_threads(), torch=torch.__version__, transformers=transformers.__version__,
        prompt_check=check,
    )
    result = {
        "peer": f"trl {trl.__version__} {type(trainer).__name__}",
        "condition": opts.condition,
        "steps": opts.steps,
        "seconds_per_step": meter.seconds,
        "generation_seconds": meter.generation_seconds,
        "completion_tokens": meter.completion_tokens,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if opts.accelerator == "gpu" else None,
        "config": config,
        "differences": DIFFERENCES["common"] + DIFFERENCES[opts.condition],
    }
    print("RESULT " + json.dumps(result, default=str), flush=True)


if __name__ == "__main__":
    main()
