"""export-gguf: the file loads back through transformers' GGUF reader with the source's logits and
greedy answers (tiny LLaMA and Qwen2), adapters export merged, the Modelfile renders the model's
chat template, bad input is one line, and llama.cpp itself (npm `node-llama-cpp`) agrees."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from chatforge.cli import main as cli_main
from chatforge.export.gguf import export_gguf
from chatforge.export.modelfile import GO_TEMPLATE
from chatforge.models.tiny import save_tiny

PROMPT = "<|im_start|>user\nWhat is 12+34? hello  world<|im_end|>\n<|im_start|>assistant\n"


def from_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kw)
    return model.eval(), AutoTokenizer.from_pretrained(path.parent, **kw)


def greedy(model, ids: torch.Tensor, n: int = 10) -> list[int]:
    out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize(("model_type", "pre"), [("llama", "gpt-2"), ("qwen2", "qwen2")])
def test_f16_loads_back_with_the_same_logits_and_answers(tmp_path, model_type, pre):
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = save_tiny(tmp_path / "src", model_type)
    out, modelfile = export_gguf(src, tmp_path / "out" / "tiny.gguf", "f16")
    fields = gguf.GGUFReader(out).fields
    assert fields["tokenizer.ggml.pre"].contents() == pre  # Qwen2's tokenizer splits digits its own way
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    model, tok = from_gguf(out)
    ids = AutoTokenizer.from_pretrained(src)(PROMPT, return_tensors="pt").input_ids
    assert tok(PROMPT).input_ids == ids[0].tolist()
    with torch.no_grad():
        got, want = model(ids).logits, ref(ids).logits
    assert torch.allclose(got, want, atol=0.03), (got - want).abs().max()
    assert greedy(model, ids) == greedy(ref, ids)
    assert modelfile.read_text().splitlines()[1] == "FROM ./tiny.gguf"


def test_q8_0_is_smaller_and_close(tmp_path):
    src = save_tiny(tmp_path / "src", "llama")
    f16, _ = export_gguf(src, tmp_path / "f16.gguf", "f16")
    q8, _ = export_gguf(src, tmp_path / "q8.gguf", "q8_0")
    assert q8.stat().st_size < 0.7 * f16.stat().st_size
    ids = torch.tensor([[1, 40, 50, 60, 70]])
    with torch.no_grad():
        a, b = from_gguf(q8)[0](ids).logits, from_gguf(f16)[0](ids).logits
    assert (a - b).abs().max() < 0.05 * b.abs().max()


def test_adapter_dir_exports_merged(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = save_tiny(tmp_path / "base", "llama")
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero, which would make merged == base
            p.data.normal_(0, 0.5)
    peft_model.save_pretrained(tmp_path / "adapter")
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(tmp_path / "adapter")
    out, _ = export_gguf(tmp_path / "adapter", tmp_path / "out" / "merged.gguf", "f16")
    ids = torch.tensor([[1, 40, 50, 60, 70, 80]])
    with torch.no_grad():
        want = peft_model.eval()(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)(ids).logits
        got = from_gguf(out)[0](ids).logits
    assert (want - plain).abs().max() > 0.5  # the adapter changes the model
    assert torch.allclose(got, want, atol=0.03), (got - want).abs().max()


def expand_go(template: str, messages: list[dict]) -> str:
    """Ollama's rendering of GO_TEMPLATE's one `range .Messages` loop, for the test's checks."""
    head, rest = template.split("{{- range .Messages }}")
    body, tail = rest.split("{{ end }}")
    each = [body.replace("{{ .Role }}", m["role"]).replace("{{ .Content }}", m["content"]) for m in messages]
    return head + "".join(each) + tail


def test_modelfile_renders_the_template_with_its_default_system_prompt(tmp_path):
    from transformers import AutoTokenizer

    src = save_tiny(tmp_path / "src", "llama")
    tok = AutoTokenizer.from_pretrained(src)
    tok.chat_template = (  # SmolLM2's shape: a default system turn when the conversation has none
        "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are Tiny.<|im_end|>\n' }}{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    tok.save_pretrained(src)
    _, modelfile = export_gguf(src, tmp_path / "out" / "t.gguf", "f16")
    text = modelfile.read_text()
    assert 'SYSTEM """You are Tiny."""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text
    assert f'TEMPLATE """{GO_TEMPLATE}"""' in text
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    want = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert expand_go(GO_TEMPLATE, chat) == want


def one_line_error(argv, capsys) -> str:
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    llama = save_tiny(tmp_path / "llama", "llama")
    gpt2 = save_tiny(tmp_path / "gpt2", "gpt2")
    out = tmp_path / "out" / "x.gguf"
    capsys.readouterr()  # the progress bars of saving the tiny models
    assert "no such model dir" in one_line_error(["export-gguf", str(tmp_path / "nope"), str(out)], capsys)
    assert "q4_k" in one_line_error(["export-gguf", llama, str(out), "--type", "q4_k"], capsys)
    assert "'gpt2' is not supported" in one_line_error(["export-gguf", gpt2, str(out)], capsys)
    config = json.loads((Path(llama) / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    (Path(llama) / "tokenizer_config.json").write_text(json.dumps(config))
    (Path(llama) / "chat_template.jinja").unlink(missing_ok=True)
    assert "ChatML" in one_line_error(["export-gguf", llama, str(out)], capsys)
    assert not out.parent.exists() or not any(out.parent.iterdir())


# llama.cpp itself, through the npm package node-llama-cpp (prebuilt binaries, no compile): greedy
# decoding from given token ids, and its own tokenisation of a text.
GREEDY_JS = r"""
import {getLlama} from "node-llama-cpp";
let input = "";
for await (const chunk of process.stdin) input += chunk;
const req = JSON.parse(input);
const llama = await getLlama({gpu: false, build: "never", logLevel: "error"});
const model = await llama.loadModel({modelPath: req.model});
const context = await model.createContext({contextSize: 256, threads: 1});
const seq = context.getSequence();
const tokens = [];
for await (const t of seq.evaluate(req.ids, {temperature: 0})) {
  tokens.push(t);
  if (tokens.length >= req.n) break;
}
const tokenized = Array.from(model.tokenize(req.text, true));
process.stdout.write(JSON.stringify({tokens, tokenized}));
"""


def node_llama_cpp_dir() -> Path:
    """A folder holding node_modules/node-llama-cpp (installed from the npm registry once, into the
    chatforge cache, with only this platform's prebuilt binaries), or a pytest skip with the reason."""
    if not (shutil.which("node") and shutil.which("npm")):
        pytest.skip("node and npm are not installed: llama.cpp check skipped")
    from chatforge.models.load import cache_dir

    where = Path(os.environ.get("CHATFORGE_NODE_LLAMA_DIR") or cache_dir() / "node-llama-cpp")
    if not (where / "node_modules" / "node-llama-cpp").is_dir():
        where.mkdir(parents=True, exist_ok=True)
        cmd = ["npm", "install", "--no-audit", "--no-fund", "--omit=optional", "node-llama-cpp@3.22.1"]
        cmd.append("@node-llama-cpp/linux-x64@3.22.1")
        try:
            done = subprocess.run(cmd, cwd=where, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            pytest.skip("npm install node-llama-cpp took over 10 minutes: llama.cpp check skipped")
        if done.returncode != 0:
            pytest.skip(f"npm install node-llama-cpp failed: {done.stderr.strip().splitlines()[-1:]}")
    return where


def test_llama_cpp_gives_the_same_greedy_tokens(tmp_path):
    import platform

    if platform.system() != "Linux" or platform.machine() != "x86_64":
        pytest.skip("the llama.cpp check installs node-llama-cpp's linux-x64 binaries only")
    where = node_llama_cpp_dir()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = save_tiny(tmp_path / "src", "llama")
    out, _ = export_gguf(src, tmp_path / "out" / "tiny.gguf", "f16")
    ids = AutoTokenizer.from_pretrained(src)(PROMPT, return_tensors="pt").input_ids
    want = greedy(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval(), ids, 12)
    (where / "greedy.mjs").write_text(GREEDY_JS)
    request = json.dumps({"model": str(out), "ids": ids[0].tolist(), "n": 12, "text": PROMPT})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        ["node", "greedy.mjs"], cwd=where, input=request, capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout)
    assert got["tokenized"] == ids[0].tolist()
    assert got["tokens"] == want
