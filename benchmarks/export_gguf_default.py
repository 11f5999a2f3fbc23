"""export-gguf on the default model: f16 and q8_0 file sizes and export times, and how many of 30
greedy answers (32 new tokens, format-task eval prompts, same prompt ids) llama.cpp gives token for
token as transformers does on the source model. Needs node and node-llama-cpp installed in NODE_DIR:

    PYTHONPATH=src:tests .venv/bin/python benchmarks/export_gguf_default.py OUT_DIR NODE_DIR
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from chatforge.data.tasks import make_task_data
from chatforge.export.gguf import export_gguf
from chatforge.models.load import load_tokenizer, resolve_model_path
from test_export_gguf import GREEDY_JS

N = 32


def main(out: Path, node_dir: Path) -> None:
    torch.set_num_threads(1)
    src = resolve_model_path("default")
    res = {}
    for kind in ("f16", "q8_0"):
        t = time.perf_counter()
        f, _ = export_gguf(src, out / kind / f"smollm2-{kind}.gguf", kind)
        res[kind] = dict(seconds=round(time.perf_counter() - t, 1), mib=round(f.stat().st_size / 2**20, 1))
    tok = load_tokenizer(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    eos = tok.eos_token_id

    def cut(ids):
        return ids[: ids.index(eos) + 1] if eos in ids else ids

    prompts, want = [], []
    for item in make_task_data("format", 0, {"eval": 30})["eval"][:30]:
        chat = [{"role": "user", "content": item["prompt"]}]
        ids = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)
        ids = list(ids["input_ids"])
        g = model.generate(torch.tensor([ids]), max_new_tokens=N, do_sample=False, pad_token_id=eos)
        prompts.append(ids)
        want.append(cut(g[0, len(ids) :].tolist()))
    (node_dir / "greedy.mjs").write_text(GREEDY_JS)
    for kind in ("f16", "q8_0"):
        same = 0
        for ids, w in zip(prompts, want):
            req = json.dumps(
                {"model": str(out / kind / f"smollm2-{kind}.gguf"), "ids": ids, "n": N, "text": ""}
            )
            done = subprocess.run(
                ["node", "greedy.mjs"], cwd=node_dir, input=req, capture_output=True, text=True
            )
            same += cut(json.loads(done.stdout)["tokens"]) == w
        res[kind]["identical_greedy"] = f"{same}/{len(want)}"
    print(json.dumps(res))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
