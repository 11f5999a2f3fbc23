"""Tiny random models and an offline tokenizer, for tests, smoke runs and pretraining presets.

Nothing here touches the network: the tokenizer is a byte-level BPE trained in milliseconds on a
built-in corpus, and models are built from configs with random weights.

    >>> tok = tiny_tokenizer()
    >>> tok.decode(tok("hello world")["input_ids"])
    'hello world'
"""

from __future__ import annotations

import functools

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = """The quick brown fox jumps over the lazy dog. hello world
What is two plus three? The answer is 5. Answer in one word. Convert 3 meters to centimeters.
You are a helpful assistant. user assistant system yes no true false JSON {"answer": 42}
0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 + - * / = ( ) , . ? ! : ; ' "
Alice has 3 apples and buys 4 more. How many apples does she have now? She has 7 apples.
The capital of France is Paris. Write a haiku about the sea. UPPER CASE lower case
"""

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]


def _bpe_json(lines, vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    return tok.to_str()


@functools.lru_cache(maxsize=4)
def _tokenizer_json(vocab_size: int) -> str:
    return _bpe_json(_CORPUS.splitlines() * 4, vocab_size)


def _wrap(tokenizer_json: str):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer_json),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token=None,
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


def tiny_tokenizer(vocab_size: int = 512):
    """A fast ChatML tokenizer (eos `<|im_end|>`, pad `<|pad|>`) trained offline on a tiny corpus."""
    return _wrap(_tokenizer_json(vocab_size))


def corpus_tokenizer(texts, vocab_size: int):
    """The same kind of tokenizer (byte-level BPE, ChatML specials) trained on `texts` (strings).

    Byte-level: any text encodes, however little of it the tokenizer saw. Pretraining from scratch
    on one's own corpus (`chatforge scaling study`) uses it to keep small models' embeddings small.
    """
    return _wrap(_bpe_json(texts, vocab_size))


# Small shapes per architecture; the keys are transformers model_type names.
_TINY_SHAPES = {
    "llama": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    ),
    "qwen2": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    ),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=512),
    "opt": dict(
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        word_embed_proj_dim=64,
    ),
    "bloom": dict(hidden_size=64, n_layer=2, n_head=4),
}

TINY_ARCHITECTURES = tuple(_TINY_SHAPES)


def tiny_config(model_type: str = "llama", tokenizer=None, **overrides):
    """A transformers config of a ~100k-parameter model of `model_type` sized for `tokenizer`."""
    from transformers import AutoConfig

    if model_type not in _TINY_SHAPES:
        raise ValueError(f"no tiny shape for {model_type!r}; known: {', '.join(_TINY_SHAPES)}")
    tok = tokenizer or tiny_tokenizer()
    ids = dict(
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    # Real checkpoints have embeddings large enough for a normed hidden state to reach confident
    # logits; the 0.02 default keeps a tiny tied head so flat that adapters alone barely learn.
    init = dict(initializer_range=0.2)
    return AutoConfig.for_model(model_type, **{**_TINY_SHAPES[model_type], **init, **ids, **overrides})


def tiny_model(model_type: str = "llama", tokenizer=None, seed: int = 0, **overrides):
    """A random-weight causal LM of `model_type`, deterministic for a given seed."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(model_type, tokenizer, **overrides)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def save_tiny(path, model_type: str = "llama", seed: int = 0, **overrides) -> str:
    """Write a tiny model and its tokenizer to `path` (a dir `from_pretrained` loads); returns it."""
    tok = tiny_tokenizer()
    model = tiny_model(model_type, tok, seed=seed, **overrides)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
