"""Exports for other runtimes: a causal LM as one GGUF file for llama.cpp, with an Ollama Modelfile.

    chatforge export-gguf MODEL OUT.gguf [--type f16|bf16|q8_0]

gguf.py writes the weights and metadata, vocab.py the tokenizer part, modelfile.py the Modelfile.
"""

__all__ = ["export_gguf", "modelfile_text"]


def __getattr__(name):  # keeps `import chatforge.export` free of numpy, torch and gguf
    if name == "export_gguf":
        from chatforge.export.gguf import export_gguf

        return export_gguf
    if name == "modelfile_text":
        from chatforge.export.modelfile import modelfile_text

        return modelfile_text
    raise AttributeError(name)
