"""How usable is a small LLM as a step critic? SmolLM2 critiques GSM8K answers it wrote itself.

    python bench/critic_agreement.py [--n 20 --model smollm2-135m-instruct --answer-tokens 256
                                      --critique-tokens 384 --batch-size 4 --out runs/critic_agreement.jsonl]

1. The solver (``--model``) answers the first ``--n`` GSM8K test problems (shipped subset), greedy, in the
   step-tagged format the training prompt asks for.
2. The same model, as ``HFCritic`` with the default four-case critique prompt, critiques each answer
   (greedy); the parser turns each reply into a Critique or fails (CritiqueParseError).
3. ``ArithmeticStepCritic`` (rule-based) critiques the same answers.

Printed: how many critiques parsed, and among the parsed ones how many first-error positions (the index
of the earliest wrong step, or none) and cases agree with the rule-based critic; one JSON line per answer
goes to ``--out`` (question, answer, raw critic reply, both verdicts) for reading by hand.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from sdlit.critics import ArithmeticStepCritic, HFCritic  # noqa: E402
from sdlit.models import load_model, load_tokenizer  # noqa: E402
from sdlit.sampling import sample_rollouts  # noqa: E402
from sdlit.settings import SamplingSettings  # noqa: E402
from sdlit.tasks.gsm8k import GSM8K  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20, help="GSM8K test problems (answers) to critique")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="solver and critic model")
    parser.add_argument("--answer-tokens", type=int, default=256, help="longest solver answer")
    parser.add_argument("--critique-tokens", type=int, default=384, help="longest critic reply")
    parser.add_argument("--batch-size", type=int, default=4, help="critic batch size")
    parser.add_argument("--out", default="runs/critic_agreement.jsonl", help="per-answer JSONL output")
    return parser.parse_args(argv)


def solver_answers(model_name: str, n: int, max_new_tokens: int):
    """Greedy step-tagged answers of the model to the first n GSM8K test problems."""
    tokenizer, model = load_tokenizer(model_name), load_model(model_name).eval()
    problems = GSM8K().eval_problems()[:n]
    with torch.inference_mode():
        return sample_rollouts(model, tokenizer, problems, n=1,
                               settings=SamplingSettings(temperature=0.0, max_new_tokens=max_new_tokens))


def parse(critic: HFCritic, reply: str, response: str):
    """The critic's Critique of a reply, or the parse error."""
    try:
        return critic.parser.parse(reply, response)
    except ValueError as err:
        return err


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    rollouts = solver_answers(args.model, args.n, args.answer_tokens)
    items = [(r.problem.question, r.problem.solution, r.response) for r in rollouts]
    critic = HFCritic(args.model, device="auto", max_new_tokens=args.critique_tokens, batch_size=args.batch_size)
    replies = critic.replies(items)
    outcomes = [reply if isinstance(reply, Exception) else parse(critic, reply, item[2])
                for item, reply in zip(items, replies, strict=False)]
    rules = ArithmeticStepCritic().critique_batch(items)
    rows, parsed, same_error, same_case = [], 0, 0, 0
    for item, reply, llm, rule in zip(items, replies, outcomes, rules, strict=False):
        ok = not isinstance(llm, Exception)
        parsed += ok
        same_error += ok and llm.first_error == rule.first_error
        same_case += ok and llm.case == rule.case
        rows.append({"question": item[0], "answer": item[2], "critic_reply": reply if isinstance(reply, str) else
                     repr(reply), "parsed": ok, "llm_error": None if ok else f"{type(llm).__name__}: {llm}",
                     "llm_first_error": llm.first_error if ok else None, "llm_case": llm.case if ok else None,
                     "rule_first_error": rule.first_error, "rule_case": rule.case})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"model": args.model, "answers": len(items), "parsed": parsed, "first_error_agree": same_error,
               "case_agree": same_case, "rule_cases": {c: sum(r.case == c for r in rules) for c in
                                                       ("correct", "missing_step", "incomplete", "wrong")},
               "seconds": round(time.perf_counter() - start, 1), "out": str(out)}
    print(json.dumps(summary))
    print(f"{parsed}/{len(items)} critiques parsed; first-error position agrees with ArithmeticStepCritic on "
          f"{same_error}/{parsed} parsed ({same_case}/{parsed} same case)")
    return summary


if __name__ == "__main__":
    main()
