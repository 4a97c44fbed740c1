"""Per-token advantage analysis: step token spans, region statistics, records, pictures and `sdlit analyze`."""

from __future__ import annotations

import json

import pytest
import torch

from sdlit.analysis import (
    RegionStats,
    TokenRecord,
    plot_advantages,
    read_records,
    region_bounds,
    token_texts,
    write_heatmap,
    write_records,
)
from sdlit.analyze import score_contexts
from sdlit.callbacks import ReferenceSolution, StepCritique
from sdlit.cli import main
from sdlit.module import SelfDistillationModule
from sdlit.rollout import Rollout, tag_step_spans
from sdlit.steps import split_steps, token_char_ends
from sdlit.tasks.base import Problem

from conftest import build_tokenizer

QUESTION = "Tom has 3 apples and buys 4 more. He then eats 2. How many apples does he have?"
SOLUTION = "3 + 4 = <<3+4=7>>7\n7 - 2 = <<7-2=5>>5\n#### 5"
RESPONSE = "Step 1: 3 + 4 = 7 apples.\nStep 2: 7 - 2 = 6 apples.\nAnswer: 5"  # step 2 (index 1) is wrong
UNICODE = "Step 1: café costs 3€ → 日本 <b>&</b>\n**Step 2:** 3 × 2 = 6 ✓\n\nAnswer: 6"


def bpe_tokenizer():
    """A byte-level BPE with merges (multi-character tokens such as ' 3', 'Step'), trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator([RESPONSE, UNICODE, QUESTION, SOLUTION] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def reference_char_ends(tokenizer, ids, text):
    """Slow reference: the longest common prefix of the text and the decoded prefix of each length."""
    ends = []
    for i in range(len(ids)):
        prefix = tokenizer.decode(ids[: i + 1], skip_special_tokens=True)
        common = 0
        while common < min(len(prefix), len(text)) and prefix[common] == text[common]:
            common += 1
        ends.append(common)
    return ends


@pytest.mark.parametrize("make_tokenizer", [build_tokenizer, bpe_tokenizer], ids=["bytes", "bpe"])
@pytest.mark.parametrize("response", [RESPONSE, UNICODE], ids=["ascii", "unicode"])
def test_step_token_spans_cover_each_steps_text(make_tokenizer, response):
    tokenizer = make_tokenizer()
    ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert token_char_ends(tokenizer, ids, response) == reference_char_ends(tokenizer, ids, response)
    rollout = Rollout(Problem(QUESTION, SOLUTION, "5", "p/0"), [1], ids, response)
    spans = tag_step_spans(rollout, tokenizer)
    assert rollout.step_spans == spans
    steps = split_steps(response)
    assert len(spans) == len(steps)
    pieces = token_texts(tokenizer, ids, response)
    assert "".join(pieces[:-1]) == response and pieces[-1] == "<|im_end|>"
    for (start, end), step in zip(spans, steps, strict=False):
        text = "".join(pieces[start:end])
        assert response[step.start : step.end] in text  # every character of the step is in its tokens
        assert len(text) <= len(response[step.start : step.end]) + 8  # and little else
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))  # in order, not overlapping


def reference_regions(advantages, spans, first_error):
    """Slow reference of the region statistics of one rollout."""
    n = len(advantages)
    if first_error is None:
        regions = {"all": range(n)}
    else:
        s, e = spans[first_error]
        regions = {"before": range(0, s), "at": range(s, e), "after": range(e, n)}
    out = {}
    for name, idx in regions.items():
        values = [advantages[i] for i in idx]
        if values:
            out[name] = (sum(values) / len(values), sum(abs(v) for v in values) / len(values),
                         sum(v < 0 for v in values) / len(values), len(values))
    return out


def test_negative_mass_in_the_wrong_step_shows_in_the_at_region():
    torch.manual_seed(0)
    spans = [(0, 10), (10, 22), (22, 30)]
    teacher = -torch.rand(31)  # log-probs of 31 response tokens
    student = teacher.clone() + 0.01 * torch.randn(31)
    teacher[10:22] -= 3.0  # the context makes the teacher disagree with step 2 (index 1)
    advantages = (teacher - student).tolist()
    stats = RegionStats()
    stats.add(advantages, spans, first_error=1)
    stats.add(advantages[:12], [(0, 5), (5, 12)], first_error=None)
    summary = stats.summary()
    expected = reference_regions(advantages, spans, 1)
    for region, (mean, mean_abs, neg, tokens) in expected.items():
        got = summary[region]
        assert got["mean"] == pytest.approx(mean) and got["mean_abs"] == pytest.approx(mean_abs)
        assert got["neg_frac"] == pytest.approx(neg) and got["tokens"] == tokens
    assert summary["all"]["tokens"] == 12 and summary["all"]["mean"] == pytest.approx(sum(advantages[:12]) / 12)
    assert summary["at"]["mean"] < -2.5 and summary["at"]["neg_frac"] == 1.0
    assert abs(summary["before"]["mean"]) < 0.05 and abs(summary["after"]["mean"]) < 0.05
    # the most negative tokens lie in the wrong step's span
    assert all(10 <= i < 22 for i in torch.tensor(advantages).argsort()[:12].tolist())
    again = RegionStats.from_tensor(stats.as_tensor() * 2)  # e.g. two processes summed
    assert again.summary()["at"]["mean"] == pytest.approx(summary["at"]["mean"])
    assert again.summary()["at"]["tokens"] == 24
    with pytest.raises(ValueError, match="first_error 3 is not one of the 3 steps"):
        region_bounds(31, spans, 3)


def make_record(**changes):
    fields = dict(tokens=["Step", " 1", ": <b>&", "\n", "Answer", ": 5", "<|im_end|>"],
                  advantages=[0.0, -0.1, 0.2, -2.0, -1.5, 0.05, 0.0], step_spans=[(0, 4), (4, 6)], first_error=1,
                  condition="StepCritique", step=3, problem_id="gsm8k/test/1", correct=False, case="wrong",
                  context_header="Review:")
    fields.update(changes)
    return TokenRecord(**fields)


def test_records_round_trip_and_bad_lines_are_named(tmp_path):
    records = [make_record(), make_record(condition="ReferenceSolution", first_error=None, advantages=[-1.0] * 7)]
    path = tmp_path / "records.jsonl"
    write_records(records[:1], path)
    write_records(records[1:], path, append=True)
    assert read_records(path) == records
    assert read_records(path)[0].step_spans == [(0, 4), (4, 6)]
    lines = path.read_text().splitlines()
    bad = json.loads(lines[0])
    del bad["advantages"]
    (tmp_path / "bad.jsonl").write_text(lines[1] + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl: line 2: field 'advantages'"):
        read_records(tmp_path / "bad.jsonl")
    bad = json.loads(lines[0]) | {"first_error": 5}
    (tmp_path / "bad.jsonl").write_text(json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match=r"line 1: first_error 5 is not one of the 2 steps"):
        read_records(tmp_path / "bad.jsonl")


def test_png_and_html_are_written(tmp_path):
    records = [make_record(), make_record(condition="ReferenceSolution")]
    png = plot_advantages(records, tmp_path / "fig.png", "title")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    page = write_heatmap([records], tmp_path / "tokens.html").read_text()
    assert ": &lt;b&gt;&amp;" in page and "<b>&" not in page and "&lt;|im_end|&gt;" in page
    assert 'title="token 3: A_t = -2.0000"' in page
    assert page.count('class="err"') == 2 * 2  # the wrong step's two tokens, in both rows


class DislikesSixWhenToldWrong(torch.nn.Module):
    """The tiny model, except that a prompt containing "wrong" (the critique) makes it shun the token "6"."""

    def __init__(self, inner, tokenizer):
        super().__init__()
        self.inner, self.config, self.tokenizer = inner, inner.config, tokenizer
        self.six = tokenizer.convert_tokens_to_ids("6")

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=use_cache)
        for row in range(input_ids.shape[0]):
            if "wrong" in self.tokenizer.decode(input_ids[row]):
                out.logits[row, :, self.six] -= 8.0
        return out


def reference_advantages(model, tokenizer, student_prompt, teacher_prompt, response_ids):
    """Slow reference: unpadded forward passes, full log-softmax, teacher minus student per response token."""
    def logprobs(prompt):
        ids = torch.tensor([prompt + response_ids])
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
        return torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(response_ids)[:, None])[:, 0]

    with torch.no_grad():
        return logprobs(teacher_prompt) - logprobs(student_prompt)


def test_critique_that_names_the_wrong_step_puts_negative_advantage_in_its_span(tiny_model_dir):
    module = SelfDistillationModule(model=tiny_model_dir, lora=None, teacher="current")
    module.configure_model()
    module.model = DislikesSixWhenToldWrong(module.model, module.tokenizer).eval()
    tokenizer = module.tokenizer
    ids = tokenizer(RESPONSE, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    from sdlit.prompts import student_prompt_ids
    rollout = Rollout(Problem(QUESTION, SOLUTION, "5", "p/0"), student_prompt_ids(tokenizer, QUESTION), ids, RESPONSE)
    tag_step_spans(rollout, tokenizer)
    rollout.feedback["first_error"] = 1
    records = score_contexts(module, rollout, [ReferenceSolution(), StepCritique()])
    reference, critique = records
    assert [r.condition for r in records] == ["ReferenceSolution", "StepCritique"]
    start, end = critique.error_span
    negative = torch.tensor(critique.advantages).argmin().item()
    assert start <= negative < end and critique.tokens[negative] == "6"
    assert critique.advantages[negative] < -5.0 and min(reference.advantages) > -1.0
    stats = RegionStats()
    stats.add(critique.advantages, critique.step_spans, critique.first_error)
    summary = stats.summary()
    assert summary["at"]["mean"] < -0.2 < summary["before"]["mean"]
    # A_t equals an independent unpadded computation with the same prompts
    copy = Rollout(rollout.problem, rollout.prompt_ids, ids, RESPONSE)
    StepCritique().annotate([copy])
    teacher_prompt = module.teacher_batch([copy])[0].input_ids[0, : -len(ids)].tolist()  # one row: no padding
    expected = reference_advantages(module.model, tokenizer, rollout.prompt_ids, teacher_prompt, ids)
    assert torch.allclose(torch.tensor(critique.advantages), expected, atol=1e-4)


def test_sdlit_analyze_from_a_model_then_from_its_records(tmp_path, tiny_model_dir, capsys):
    problems = tmp_path / "problems.jsonl"
    rows = [{"question": QUESTION, "answer": SOLUTION, "response": RESPONSE},
            {"question": "Ann has 2 pens and gets 5 more. How many pens does she have?",
             "answer": "2 + 5 = <<2+5=7>>7\n#### 7"}]
    problems.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    main(["analyze", "--model", tiny_model_dir, "--problems", str(problems), "--count", "2",
          "--max_new_tokens", "12", "--contexts+=ReferenceSolution", "--contexts+=feedback_examples.AnswerHint",
          "--contexts+=StepCritique", "--output_dir", str(out)])
    printed = capsys.readouterr().out
    assert "Per-token advantage" in printed and "AnswerHint" in printed
    records = read_records(out / "records.jsonl")
    assert [r.condition for r in records] == ["ReferenceSolution", "AnswerHint", "StepCritique"] * 2
    given = records[0]
    assert given.first_error == 1 and given.correct is True and "".join(given.tokens[:-1]) == RESPONSE
    assert len(records[3].tokens) <= 12 and records[3].problem_id == "problems/1"
    figures = sorted(out.glob("*.png"))
    assert len(figures) == 2 and all(f.read_bytes()[:4] == b"\x89PNG" for f in figures)
    assert "&lt;|im_end|&gt;" in (out / "tokens.html").read_text()
    table = (out / "regions.csv").read_text().splitlines()
    assert table[0].startswith("problem_id,step,condition,region")
    assert "problems/0,0,StepCritique,at," in "\n".join(table)
    # mode (a): the saved records give the same table
    again = tmp_path / "again"
    main(["analyze", "--records", str(out / "records.jsonl"), "--output_dir", str(again)])
    assert (again / "regions.csv").read_text() == (out / "regions.csv").read_text()
    assert len(list(again.glob("*.png"))) == 2
    # only wrong answers: the given (right) answer is skipped, the sampled one kept
    main(["analyze", "--model", tiny_model_dir, "--problems", str(problems), "--only_wrong", "true",
          "--max_new_tokens", "12", "--output_dir", str(tmp_path / "wrong")])
    kept = read_records(tmp_path / "wrong" / "records.jsonl")
    assert {r.problem_id for r in kept} == {"problems/1"} and all(r.correct is False for r in kept)


def test_analyze_help_and_bad_arguments(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["analyze", "--help"])
    assert exit_info.value.code == 0
    assert "usage: sdlit analyze" in capsys.readouterr().out
    with pytest.raises(ValueError, match="either --records FILE or --model NAME"):
        main(["analyze", "--output_dir", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="no file"):
        main(["analyze", "--records", str(tmp_path / "missing.jsonl")])


@pytest.mark.slow
def test_analyze_on_the_packaged_model(tmp_path):
    out = tmp_path / "smol"
    main(["analyze", "--model", "smollm2-135m-instruct", "--task", "GSM8K", "--indices", "[0]",
          "--max_new_tokens", "48", "--output_dir", str(out)])
    records = read_records(out / "records.jsonl")
    assert [r.condition for r in records] == ["ReferenceSolution", "StepCritique"]
    assert (out / "00_gsm8k-test-0_step0.png").read_bytes()[:4] == b"\x89PNG" and (out / "tokens.html").stat().st_size
