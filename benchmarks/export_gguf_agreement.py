"""export-gguf: where and why llama.cpp's greedy answers leave transformers'. For each prompt,
transformers (fp32, the source model) generates N greedy tokens; llama.cpp (node-llama-cpp) is fed
the same prompt ids plus those tokens (teacher forcing) and returns its raw logits at every answer
position, so the first position where its argmax differs is the first divergence of free-running
greedy decoding. At that position it prints chatforge's top-2 logit gap (fp32): a gap near 0 is a
float near-tie, a large one an export bug. At the first answer position it also compares the full
logit vectors (max |diff|, top-10 overlap).

    PYTHONPATH=src .venv/bin/python benchmarks/export_gguf_agreement.py MODEL OUT_DIR NODE_DIR \
        [--eval-jsonl FILE] [--prompts 30] [--n 32]

MODEL is `default` or a model dir; prompts are the format task's eval prompts, or the first
--prompts lines of an eval.jsonl ({"prompt": ...}). NODE_DIR holds node_modules/node-llama-cpp.
"""

import argparse
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from chatforge.data.tasks import make_task_data
from chatforge.export.gguf import export_gguf
from chatforge.models.load import load_model, load_tokenizer, resolve_model_path

LOGITS_JS = r"""
import {getLlama} from "node-llama-cpp";
let input = "";
for await (const chunk of process.stdin) input += chunk;
const req = JSON.parse(input);
const llama = await getLlama({gpu: false, build: "never", logLevel: "error"});
const model = await llama.loadModel({modelPath: req.model});
const context = await model.createContext({contextSize: 512, threads: 1});
const seq = context.getSequence();
const out = [];
for (const item of req.items) {
  await seq.clearHistory();
  const ids = item.prompt.concat(item.answer.slice(0, -1));
  const input = ids.map((t, i) => {
    if (i < item.prompt.length - 1) return t;
    const first = i === item.prompt.length - 1;
    const logits = first ? true : {filter: {tokens: [item.answer[i - item.prompt.length + 1]], includeTop: 2}};
    return [t, {generateNext: {logits}}];
  });
  const res = await seq.controlledEvaluate(input);
  out.push(res.slice(item.prompt.length - 1).map((r) => Array.from(r.next.logits.entries())));
}
process.stdout.write(JSON.stringify(out));
"""


def prompts_of(tok, eval_jsonl: Path | None, count: int) -> list[list[int]]:
    if eval_jsonl is None:
        items = make_task_data("format", 0, {"eval": count})["eval"][:count]
    else:
        items = [json.loads(line) for line in eval_jsonl.read_text().splitlines()[:count]]
    out = []
    for item in items:
        chat = [{"role": "user", "content": item["prompt"]}]
        ids = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)
        out.append(list(ids["input_ids"]))
    return out


def transformers_greedy(model, tok, prompts, n):
    """[(answer ids cut after eos, fp32 logits [len(answer), vocab])] per prompt."""
    eos = tok.eos_token_id
    res = []
    for ids in prompts:
        g = model.generate(
            torch.tensor([ids]),
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=eos,
            return_dict_in_generate=True,
            output_logits=True,
        )
        ans = g.sequences[0, len(ids) :].tolist()
        if eos in ans:
            ans = ans[: ans.index(eos) + 1]
        logits = torch.stack([s[0] for s in g.logits[: len(ans)]]).float().numpy()
        res.append((ans, logits))
    return res


def compare(want, got) -> dict:
    """One prompt: want = (answer, chatforge logits), got = llama.cpp's [(token, logit)] lists."""
    ans, cf = want
    first = dict(got[0])
    ll0 = np.array([first[t] for t in range(cf.shape[1])], dtype=np.float32)
    top = set(np.argsort(-cf[0])[:10].tolist()) & set(np.argsort(-ll0)[:10].tolist())
    row = {"pos0_max_abs_diff": float(np.abs(ll0 - cf[0]).max()), "pos0_top10_overlap": len(top)}
    for i, (tok, pairs) in enumerate(zip(ans, got)):
        best = max(pairs, key=lambda p: p[1])[0] if i else int(ll0.argmax())
        if best != tok:
            s = np.sort(cf[i])[::-1]
            ll = dict(pairs) if i else first
            row |= {
                "first_diff": i,
                "cf_top2_gap": float(s[0] - s[1]),
                "llama_gap_its_token_minus_cf_token": float(ll[best] - ll[tok]),
            }
            return row
    return row | {"first_diff": None}


def run_one(kind, gguf_file, wants, prompts, node_dir):
    items = [{"prompt": p, "answer": a} for p, (a, _) in zip(prompts, wants)]
    req = json.dumps({"model": str(gguf_file), "items": items})
    done = subprocess.run(
        ["node", "logits.mjs"], cwd=node_dir, input=req, capture_output=True, text=True, check=True
    )
    rows = [compare(w, g) for w, g in zip(wants, json.loads(done.stdout))]
    for i, r in enumerate(rows):
        print(json.dumps({"type": kind, "prompt": i} | r))
    diffs = [r for r in rows if r["first_diff"] is not None]
    gaps = sorted(r["cf_top2_gap"] for r in diffs)
    return {
        "identical_greedy": f"{len(rows) - len(diffs)}/{len(rows)}",
        "cf_top2_gap_at_first_diff_max": round(max(gaps), 4) if gaps else None,
        "cf_top2_gap_at_first_diff_median": round(float(np.median(gaps)), 4) if gaps else None,
        "first_diff_under_0.1": sum(g < 0.1 for g in gaps),
        "pos0_max_abs_logit_diff_max": round(max(r["pos0_max_abs_diff"] for r in rows), 4),
        "pos0_top10_overlap_min": min(r["pos0_top10_overlap"] for r in rows),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("out", type=Path)
    p.add_argument("node_dir", type=Path)
    p.add_argument("--eval-jsonl", type=Path)
    p.add_argument("--prompts", type=int, default=30)
    p.add_argument("--n", type=int, default=32)
    a = p.parse_args()
    torch.set_num_threads(1)
    src = resolve_model_path(a.model) if a.model == "default" else a.model
    tok = load_tokenizer(str(src))
    model = load_model(str(src), dtype=torch.float32, device=torch.device("cpu")).eval()
    prompts = prompts_of(tok, a.eval_jsonl, a.prompts)
    t = time.perf_counter()
    wants = transformers_greedy(model, tok, prompts, a.n)
    print(json.dumps({"transformers_seconds": round(time.perf_counter() - t, 1)}))
    (a.node_dir / "logits.mjs").write_text(LOGITS_JS)
    summary = {}
    for kind in ("f16", "q8_0"):
        f, _ = export_gguf(src, a.out / kind / f"model-{kind}.gguf", kind)
        summary[kind] = run_one(kind, f, wants, prompts, a.node_dir)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
