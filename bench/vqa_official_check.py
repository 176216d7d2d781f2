"""Check tests/test_evaluation.py's VQA cases against the official VQA evaluation code.

    git clone https://github.com/GT-Vision-Lab/VQA /tmp/VQA   # checked at a013f00
    python bench/vqa_official_check.py /tmp/VQA

The official vqaEval.py is Python 2 (print statements); this script turns those into calls in
memory, runs its VQAEval on the cases, and prints each official accuracy next to anymodal's.
Nothing of that code is kept in the repository: it is the reference, run from its own checkout.
"""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main(checkout: str) -> int:
    from test_evaluation import VQA_CASES

    from anymodal.evaluation.metrics import vqa_accuracy

    src = (Path(checkout) / "PythonEvaluationTools" / "vqaEvaluation" / "vqaEval.py").read_text()
    src = re.sub(r'print "(.*)"', r'print("\1")', src)
    mod = types.ModuleType("vqaEval")
    exec(compile(src, "vqaEval.py", "exec"), mod.__dict__)
    gts, res = types.SimpleNamespace(), types.SimpleNamespace()
    gts.qa = {i: {"answers": [{"answer": a, "answer_id": j + 1, "answer_confidence": "yes"} for j, a in enumerate(ans)],
                  "question_type": "q", "answer_type": "other"} for i, (_, ans, _) in enumerate(VQA_CASES)}
    res.qa = {i: {"answer": p} for i, (p, _, _) in enumerate(VQA_CASES)}
    gts.getQuesIds = lambda: list(gts.qa)
    ev = mod.VQAEval(gts, res, n=10)
    ev.evaluate()
    bad = 0
    print()
    for i, (p, ans, expected) in enumerate(VQA_CASES):
        official, ours = ev.evalQA[i] / 100, vqa_accuracy(p, ans)
        ok = abs(official - ours) < 1e-9 and abs(official - expected) < 1e-9
        bad += not ok
        print(f"{p!r:18} official {official:.4f}  anymodal {ours:.4f}  test expects {expected:.4f}  {'ok' if ok else 'DIFFERS'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/VQA"))
