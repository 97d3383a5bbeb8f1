"""The README's quick-start example runs as written and prints a cosine that matches an independent computation."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parent.parent / "README.md"


def quickstart_code() -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(r"<!-- quickstart -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README has no quick-start python block after a <!-- quickstart --> marker"
    return match.group(1)


def test_quickstart_is_five_lines_and_runs():
    code = quickstart_code()
    assert len([line for line in code.splitlines() if line.strip()]) == 5
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    printed = float(out.stdout.strip().splitlines()[-1])

    from sentence_transformers import SentenceTransformer
    from kalm_lib.model import minilm_path

    st = SentenceTransformer(minilm_path(), device="cpu")
    a, b = st.encode(["A man is playing a guitar.", "Someone plays an instrument."])
    expected = float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
    assert abs(printed - expected) < 1e-4
    assert 0.3 < printed < 1.0  # related sentences: a clearly positive cosine
