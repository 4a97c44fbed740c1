"""Step splitting of solver answers."""

from __future__ import annotations

from sdlit.steps import STEP_FORMAT_INSTRUCTION, has_step_tags, split_steps


def _check_spans(response, steps):
    for step in steps:
        assert step.text in response[step.start : step.end]


def test_tagged_steps_and_answer():
    response = "Step 1: 48/2 = 24 clips in May.\nStep 2: 48 + 24 = 72 clips.\nAnswer: 72"
    steps = split_steps(response)
    assert [(s.index, s.kind, s.text) for s in steps] == [
        (0, "step", "48/2 = 24 clips in May."), (1, "step", "48 + 24 = 72 clips."), (2, "answer", "72")]
    assert response[steps[0].start : steps[0].end] == "Step 1: 48/2 = 24 clips in May."
    _check_spans(response, steps)
    assert has_step_tags(response)


def test_tag_variants():
    response = "**Step 1:** a\nstep 2 - b\nStep 3. c\n**Step 4**: d\n### Step 5) e\nFinal answer: 5"
    steps = split_steps(response)
    assert [s.text for s in steps] == ["a", "b", "c", "d", "e", "5"]
    assert steps[-1].kind == "answer"
    assert response[steps[0].start : steps[0].end] == "**Step 1:** a"
    _check_spans(response, steps)


def test_multiline_steps_preamble_and_trailer():
    response = "Let me think.\n\nStep 1: First\nstill step one\n\nStep 2: Second\n#### 9\nHope this helps!"
    steps = split_steps(response)
    assert [s.text for s in steps] == ["First\nstill step one", "Second", "9"]
    assert response[steps[0].start : steps[0].end] == "Step 1: First\nstill step one"
    assert [s.kind for s in steps] == ["step", "step", "answer"]
    _check_spans(response, steps)


def test_untagged_fallback():
    response = "She sold 24 in May.\n\n  48 + 24 = 72\nThe answer is 72."
    assert not has_step_tags(response)
    steps = split_steps(response)
    assert [(s.kind, s.text) for s in steps] == [("step", "She sold 24 in May."), ("step", "48 + 24 = 72"),
                                                 ("answer", "72.")]
    assert response[steps[1].start : steps[1].end] == "48 + 24 = 72"
    _check_spans(response, steps)


def test_edge_cases():
    assert split_steps("") == []
    assert split_steps("Step 1: only work") [0].kind == "step"
    assert not has_step_tags("We take 3 steps: 1, 2, 3")
    assert "Step 1:" in STEP_FORMAT_INSTRUCTION and "Answer:" in STEP_FORMAT_INSTRUCTION


def test_decoration_runs_are_read_in_linear_time():
    """A long run of markdown characters (SmolLM2 writes such lines) once made the tag regex backtrack
    exponentially: 40 stars took longer than any timeout."""
    import time

    response = "*" * 40 + " x\n" + "#_*" * 200 + "\nStep 1: 2 + 2 = 4\n**Answer:** 4"
    started = time.perf_counter()
    steps = split_steps(response)
    assert time.perf_counter() - started < 1.0
    assert [s.kind for s in steps] == ["step", "answer"]
    assert steps[0].text == "2 + 2 = 4" and steps[1].text == "4"
