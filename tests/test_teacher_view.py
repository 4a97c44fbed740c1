"""The teacher view: the response follows exactly the tokens the student saw, whatever the two templates do."""

from __future__ import annotations

import pytest

from sdlit.prompts import (
    check_teacher_view,
    generation_prompt,
    student_message,
    student_prompt_ids,
    teacher_message,
    teacher_prompt_ids,
)

from conftest import build_thinking_tokenizer, build_tokenizer

QUESTION = "Tom has 3 apples and buys 4 more. How many apples?"
CONTEXT = "Step 1 is wrong: 3 + 4 is 7.\nCorrected solution:\nStep 1: 3 + 4 = 7\nAnswer: 7"
HEADER = "Feedback on your previous attempt:"
OFF, ON = {"enable_thinking": False}, {"enable_thinking": True}
NO_THINK_END = "<|im_start|>assistant\n<think>\n\n</think>\n\n"

# R1-style: thinking on opens a think block the answer continues; thinking off closes an empty one
OPEN_THINK_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '\\n</think>\\n\\n' }}{% endif %}{% endif %}"
)
# thinking on opens <think>\n, thinking off adds nothing: a thinking teacher would open a block the student never saw
OPEN_ONLY_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is not defined or enable_thinking %}<think>\n{% endif %}{% endif %}"
)


def ids(tokenizer, text, add_special_tokens=False):
    return tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]


def chatml(message: str, end: str = "<|im_start|>assistant\n") -> str:
    return f"<|im_start|>user\n{message}<|im_end|>\n{end}"


def teacher(tokenizer, student_kwargs, teacher_kwargs, context=CONTEXT, max_tokens=10**6):
    return teacher_prompt_ids(
        tokenizer, QUESTION, context, HEADER, max_tokens, student_template_kwargs=student_kwargs, **teacher_kwargs
    )


def test_thinking_teacher_ends_with_the_students_generation_prompt():
    tokenizer = build_thinking_tokenizer()
    student = student_prompt_ids(tokenizer, QUESTION, **OFF)
    prompt = teacher(tokenizer, OFF, ON)
    end = ids(tokenizer, NO_THINK_END)
    assert student[-len(end):] == end and prompt.ids[-len(end):] == end
    assert prompt.ids == ids(tokenizer, chatml(teacher_message(QUESTION, CONTEXT, HEADER), NO_THINK_END))
    text = tokenizer.decode(prompt.ids)
    assert QUESTION in text and CONTEXT in text and text.count("<think>") == 1 and not prompt.truncated
    assert check_teacher_view(tokenizer, OFF, ON) == "<think>\n\n</think>\n\n"


def test_an_open_think_block_is_closed_like_the_students():
    tokenizer = build_thinking_tokenizer(OPEN_THINK_TEMPLATE)
    assert generation_prompt(tokenizer, "q", **ON) == "<|im_start|>assistant\n<think>\n"
    assert check_teacher_view(tokenizer, OFF, ON) == "\n</think>\n\n"
    student = student_prompt_ids(tokenizer, QUESTION, **OFF)
    end = ids(tokenizer, NO_THINK_END)
    assert student[-len(end):] == end and teacher(tokenizer, OFF, ON).ids[-len(end):] == end


@pytest.mark.parametrize("kwargs", [OFF, ON, {}])
def test_equal_kwargs_change_nothing(kwargs):
    tokenizer = build_thinking_tokenizer()
    end = NO_THINK_END if kwargs == OFF else "<|im_start|>assistant\n"
    expected = ids(tokenizer, chatml(teacher_message(QUESTION, CONTEXT, HEADER), end))
    assert teacher(tokenizer, kwargs, kwargs).ids == expected
    assert teacher_prompt_ids(tokenizer, QUESTION, CONTEXT, HEADER, 10**6, **kwargs).ids == expected
    assert check_teacher_view(tokenizer, kwargs, kwargs) == ""


@pytest.mark.parametrize("student_kwargs", [None, {}, OFF])
def test_plain_chatml_template_is_unchanged(student_kwargs):
    tokenizer = build_tokenizer()
    expected = ids(tokenizer, chatml(teacher_message(QUESTION, CONTEXT, HEADER)))
    assert teacher(tokenizer, student_kwargs, {}).ids == expected
    assert teacher_prompt_ids(tokenizer, QUESTION, CONTEXT, HEADER, 10**6).ids == expected
    assert check_teacher_view(tokenizer, student_kwargs, ON) == ""


def test_no_chat_template_keeps_the_plain_layout():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = None
    expected = ids(tokenizer, f"Question: {teacher_message(QUESTION, CONTEXT, HEADER)}\nAnswer:", True)
    assert teacher(tokenizer, OFF, ON).ids == expected
    assert teacher_prompt_ids(tokenizer, QUESTION, CONTEXT, HEADER, 10**6).ids == expected
    assert check_teacher_view(tokenizer, OFF, ON) == ""
    student = ids(tokenizer, f"Question: {student_message(QUESTION)}\nAnswer:", True)
    assert student_prompt_ids(tokenizer, QUESTION) == student


@pytest.mark.parametrize(("template", "student_kwargs", "teacher_kwargs", "student_end", "teacher_end"), [
    (None, ON, OFF, "<|im_start|>assistant\n", NO_THINK_END),
    (OPEN_ONLY_TEMPLATE, OFF, ON, "<|im_start|>assistant\n", "<|im_start|>assistant\n<think>\n"),
])
def test_unalignable_views_raise_naming_kwargs_and_endings(
    template, student_kwargs, teacher_kwargs, student_end, teacher_end
):
    tokenizer = build_thinking_tokenizer(template)
    for call in (lambda: check_teacher_view(tokenizer, student_kwargs, teacher_kwargs),
                 lambda: teacher(tokenizer, student_kwargs, teacher_kwargs)):
        with pytest.raises(ValueError, match="cannot be aligned") as error:
            call()
        message = str(error.value)
        assert f"student_template_kwargs={student_kwargs!r}" in message
        assert f"teacher_template_kwargs={teacher_kwargs!r}" in message
        assert repr(student_end) in message and repr(teacher_end) in message


def test_a_template_whose_closed_render_is_no_prefix_raises():
    tokenizer = build_thinking_tokenizer(
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
        "{% if add_generation_prompt %}<|im_end|>\n<|im_start|>assistant\n{% else %}<|endoftext|>{% endif %}"
        "{% endfor %}"
    )
    with pytest.raises(ValueError, match="not a prefix") as error:
        check_teacher_view(tokenizer, OFF, ON)
    assert "template_kwargs=" in str(error.value)


def test_truncation_cuts_only_the_context():
    tokenizer = build_thinking_tokenizer()
    context = "x " * 500
    bare = teacher(tokenizer, OFF, ON, context="").ids
    context_ids = ids(tokenizer, context)
    prompt = teacher(tokenizer, OFF, ON, context=context, max_tokens=len(bare) + 20)
    assert prompt.truncated and len(prompt.ids) == len(bare) + 20
    rendered = chatml(teacher_message(QUESTION, "\x00", HEADER), NO_THINK_END)
    before, after = rendered.split("\x00")
    assert prompt.ids == ids(tokenizer, before) + context_ids[:20] + ids(tokenizer, after)
    end = ids(tokenizer, NO_THINK_END)
    assert prompt.ids[-len(end):] == end and QUESTION in tokenizer.decode(prompt.ids)


def test_truncation_flag_and_a_window_too_small_for_any_context():
    tokenizer = build_thinking_tokenizer()
    bare = teacher(tokenizer, OFF, ON, context="").ids
    exact = teacher(tokenizer, OFF, ON, max_tokens=len(bare) + len(ids(tokenizer, CONTEXT)))
    assert not exact.truncated and exact.ids == teacher(tokenizer, OFF, ON).ids
    tiny = teacher(tokenizer, OFF, ON, max_tokens=5)
    assert tiny.truncated and tiny.ids == bare  # question and generation prompt are never cut


# ---- the module: teacher batches follow the rule, a run with unalignable views stops at its start -------------
@pytest.fixture(scope="module")
def thinking_model_dir(tmp_path_factory):
    from conftest import build_tiny_model

    path = tmp_path_factory.mktemp("tiny-thinking")
    tokenizer = build_thinking_tokenizer()
    model = build_tiny_model(len(tokenizer))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_module_teacher_batch_puts_the_response_after_the_students_tokens(thinking_model_dir):
    from sdlit.module import SelfDistillationModule
    from sdlit.rollout import Rollout
    from sdlit.tasks.base import Problem

    module = SelfDistillationModule(model=thinking_model_dir, lora=None, student_template_kwargs=OFF,
                                    teacher_template_kwargs=ON)
    module.configure_model()
    tokenizer = module.tokenizer
    prompt = student_prompt_ids(tokenizer, QUESTION, **OFF)
    response = ids(tokenizer, "Step 1: 3 + 4 = 7\nAnswer: 7") + [tokenizer.eos_token_id]
    rollout = Rollout(problem=Problem(QUESTION, "3+4=7\n#### 7", "7", "p"), prompt_ids=prompt,
                      response_ids=response, response="Step 1: 3 + 4 = 7\nAnswer: 7", context=CONTEXT)
    batch, has_context, truncated = module.teacher_batch([rollout])
    row = batch.input_ids[0][batch.attention_mask[0].bool()].tolist()
    end = ids(tokenizer, NO_THINK_END)
    assert row[-len(response):] == response
    assert row[-len(response) - len(end):-len(response)] == end == prompt[-len(end):]
    assert has_context.tolist() == [True] and truncated == 0


def test_a_run_whose_views_cannot_be_aligned_stops_at_fit_start(thinking_model_dir, tmp_path):
    from sdlit.cli import run_cli

    from conftest import write_config

    config = write_config(tmp_path, thinking_model_dir, callbacks=["ReferenceSolution"])
    with pytest.raises(ValueError, match=r"teacher view cannot be aligned.*enable_thinking"):
        run_cli(["fit", "--config", config, "--model.student_template_kwargs", '{"enable_thinking": true}',
                 "--model.teacher_template_kwargs", '{"enable_thinking": false}'])
