"""Imports run one way: core modules never load the callbacks or the analysis package."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

CORE = ["sdlit.data", "sdlit.module", "sdlit.rollout", "sdlit.objectives", "sdlit.sampling", "sdlit.feedback",
        "sdlit.offline", "sdlit.sft", "sdlit.critics", "sdlit.tasks", "sdlit.kernels"]


def loaded_after_import(module: str) -> list[str]:
    code = f"import json, sys; import {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("module", CORE)
def test_core_modules_load_neither_callbacks_nor_analysis(module):
    above = [m for m in loaded_after_import(module) if m.startswith(("sdlit.callbacks", "sdlit.analysis", "sdlit.cli"))]
    assert not above, f"importing {module} loaded {above}"


def test_the_analysis_package_depends_on_nothing_above_it():
    loaded = loaded_after_import("sdlit.analysis")
    above = [m for m in loaded if m.startswith(("sdlit.callbacks", "sdlit.module", "sdlit.data", "sdlit.cli"))]
    assert not above, f"importing sdlit.analysis loaded {above}"


def test_feedback_base_class_is_one_class_under_both_names():
    from sdlit.callbacks import Feedback as from_callbacks
    from sdlit.feedback import Feedback

    assert from_callbacks is Feedback
