"""Each kind of adapter has one home, adapter_kinds.py: the rest of the code asks its table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import lora_gui
from lora_gui.adapter_kinds import ADAPTER_KINDS

pytestmark = pytest.mark.unit


def test_no_module_but_the_table_names_a_kind_of_adapter():
    # Plain LoRA is left out: "lora" is also the setting's default and a word in many names.
    named = re.compile("|".join(rf"[\"']{name}[\"']" for name in ADAPTER_KINDS if name != "lora"))
    package = Path(lora_gui.__file__).parent
    found = [
        f"{path.relative_to(package)}: {match[0]}"
        for path in sorted(package.rglob("*.py"))
        if path.name != "adapter_kinds.py"
        for match in named.finditer(path.read_text(encoding="utf-8"))
    ]
    assert found == [], "a kind of adapter named outside adapter_kinds.py: add what it needs to the kind's entry"
