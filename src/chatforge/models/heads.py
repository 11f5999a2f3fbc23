"""Scalar heads on a causal LM backbone, by composition: reward scores and per-token values.

`ScalarHeadModel(lm)` runs the LM's decoder (with whatever adapter is active) and maps each hidden
state to one number with a small fp32 linear head. A reward model reads it at the last real token
(`score`), a critic at every token (`forward`). The head is saved next to the adapter or model as
`<name>.safetensors` with a one-line JSON sidecar, so the LM part stays loadable by transformers/peft.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from chatforge.models import base_model
from chatforge.models.logprobs import last_hidden_states


def hidden_size_of(lm) -> int:
    """Width of the hidden states the LM head reads (OPT may project them first)."""
    return base_model(lm).get_output_embeddings().weight.shape[1]


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token per row, for left or right padding.

    >>> last_token_index(torch.tensor([[1, 1, 0], [0, 1, 1]])).tolist()
    [1, 2]
    """
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(-1)


class ScalarHeadModel(nn.Module):
    """A causal LM backbone plus a linear head giving one fp32 number per position."""

    def __init__(self, lm, head: nn.Linear | None = None, name: str = "score"):
        super().__init__()
        self.lm = lm
        self.name = name
        if head is None:
            width = hidden_size_of(lm)
            head = nn.Linear(width, 1, bias=True, dtype=torch.float32)
            nn.init.normal_(head.weight, std=1 / (width + 1) ** 0.5)
            nn.init.zeros_(head.bias)
        device = next(lm.parameters()).device
        self.head = head.to(device)

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
        return last_hidden_states(self.lm, input_ids, attention_mask, position_ids)

    def forward(self, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
        """Values (B, T) fp32, one per token."""
        return self.read(self.hidden_states(input_ids, attention_mask, position_ids))

    def read(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head alone on hidden states (..., H) -> (...) fp32."""
        # autocast would run the small head in bf16; scores and values stay fp32
        with torch.autocast(hidden.device.type, enabled=False):
            return self.head(hidden.float()).squeeze(-1)

    def score(self, input_ids, attention_mask) -> torch.Tensor:
        """Scores (B,) fp32 read at each row's last real token."""
        values = self(input_ids, attention_mask)
        return values.gather(1, last_token_index(attention_mask)[:, None]).squeeze(1)

    def save_head(self, out_dir: str | Path, extra: dict | None = None) -> None:
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().float().cpu().contiguous() for k, v in self.head.state_dict().items()}
        save_file(state, str(out / f"{self.name}_head.safetensors"))
        meta = {"name": self.name, "in_features": self.head.in_features, **(extra or {})}
        (out / f"{self.name}_head.json").write_text(json.dumps(meta, indent=1))


def load_head(model_dir: str | Path, name: str = "score") -> tuple[nn.Linear, dict]:
    """The saved head and its JSON metadata from `model_dir`."""
    from safetensors.torch import load_file

    from chatforge.errors import ChatforgeError

    path = Path(model_dir) / f"{name}_head.safetensors"
    if not path.is_file():
        raise ChatforgeError(f"{model_dir}: no {path.name} (not a chatforge {name} model)")
    state = load_file(str(path))
    meta = json.loads((Path(model_dir) / f"{name}_head.json").read_text())
    head = nn.Linear(state["weight"].shape[1], 1, bias="bias" in state, dtype=torch.float32)
    head.load_state_dict(state)
    return head, meta


@torch.no_grad()
def normalise_head(head: nn.Linear, mean: float, std: float) -> nn.Linear:
    """Rescale a linear head in place so it outputs (old_output - mean) / std.

    >>> h = nn.Linear(2, 1); x = torch.randn(3, 2); before = h(x)
    >>> torch.allclose(normalise_head(h, 1.5, 2.0)(x), (before - 1.5) / 2.0, atol=1e-6)
    True
    """
    head.weight.div_(std)
    if head.bias is None:
        head.bias = nn.Parameter(torch.zeros(head.out_features, dtype=head.weight.dtype))
    head.bias.sub_(mean).div_(std)
    return head


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout to p=0 so rollout and training log-probs agree (RL needs ratio 1 at start)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    cfg = getattr(model, "config", None)
    for key in ("attention_dropout", "hidden_dropout", "resid_pdrop", "attn_pdrop", "embd_pdrop", "dropout"):
        if cfg is not None and isinstance(getattr(cfg, key, None), float):
            setattr(cfg, key, 0.0)
