"""Text-only held-out copying of a toy-world pipeline's LLM (``toyworld.llm.evaluate_llm``).

Stage 3 can weaken how the LLM copies a held-out request ("a purple cross") into its reply, apart from
any generator; this reads that part alone: 40 held-out dialogues per text-determined task (t2i, t2a,
t2v and the edits), ``(ok, exact)`` per task, and two examples each for t2i and t2a.

    python bench/toyworld_llm_copying.py runs/full2/final [N]
"""

import json
import sys
import warnings

warnings.filterwarnings("ignore")

from anymodal import AnyModalPipeline  # noqa: E402
from anymodal.toyworld.llm import evaluate_llm  # noqa: E402

if len(sys.argv) < 2:
    raise SystemExit(__doc__)
pipe = AnyModalPipeline.from_pretrained(sys.argv[1])
n = int(sys.argv[2]) if len(sys.argv) > 2 else 40
r = evaluate_llm(pipe.model.language_model, pipe.processor, n, 7001, "heldout")
print(sys.argv[1], json.dumps({k: (v["ok"], v["exact"]) for k, v in r.items()}))
for k in ("t2i", "t2a"):
    for e in r[k]["examples"][:2]:
        print("   ", k, e["request"], "->", e["reply"])
