"""Loading PPO's four roles (actor, critic, reference, reward) in the layout `peft.method` and
`ppo.layout` ask for: `build_roles(cfg)` -> `chatforge.rl.roles.Roles` (the switch; its module
docstring draws both layouts).

    lean      one frozen base; "actor" (and "critic") LoRA adapters, the reference as a frozen "ref"
              adapter (model.path an SFT adapter dir) or the base with adapters disabled, the reward
              model as a "reward" adapter when it is a LoRA of the same base
    separate  actor, critic, a frozen reference copy (`rl.reference.load_full`) and the reward model
              as separate models; `ppo.offload_frozen` parks the frozen ones on CPU between uses
"""

from __future__ import annotations

import os
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
from torch import nn

from chatforge.errors import ConfigError
from chatforge.rl.reference import load_full
from chatforge.rl.roles import Roles


def _same_path(a: str, b: str) -> bool:
    from chatforge.models.load import resolve_model_path

    try:
        return os.path.realpath(resolve_model_path(a)) == os.path.realpath(resolve_model_path(b))
    except ConfigError:
        return a == b


def _check_lora(path: str, what: str) -> None:
    import json

    kind = json.loads((Path(path) / "adapter_config.json").read_text()).get("peft_type", "LORA")
    if kind != "LORA":
        raise ConfigError(f"{what}: {path} is a {kind} adapter; PPO's shared-base layout needs LoRA adapters")


def critic_mode(ppo) -> str:
    """`ppo.critic` resolved: auto = adapter with a critic (gae); with a critic-free estimator the
    role is a value head on the actor that nothing trains (one linear layer, no critic passes)."""
    from chatforge.rl.advantages import ESTIMATORS

    if ppo.critic != "auto":
        return ppo.critic
    return "adapter" if ESTIMATORS[ppo.advantage].critic else "head"


# critic settings: what a critic-free estimator would silently ignore
CRITIC_KEYS = ("critic", "critic_init", "critic_lr", "vf_coef", "value_clip_eps", "lam")


def check_estimator(p) -> None:
    """The advantage estimator against its settings (`cfg.ppo`); the pipeline calls it before any stage runs."""
    from dataclasses import fields

    from chatforge.config import PPOConfig
    from chatforge.rl.advantages import ESTIMATORS

    est = ESTIMATORS[p.advantage]
    if p.samples_per_prompt < 1:
        raise ConfigError("ppo.samples_per_prompt must be at least 1")
    if est.grouped and p.samples_per_prompt < 2:
        raise ConfigError(
            f"ppo.advantage={p.advantage} compares the answers to one prompt: set ppo.samples_per_prompt "
            f">= 2 (got {p.samples_per_prompt})"
        )
    if not est.critic:
        default = {f.name: f.default for f in fields(PPOConfig) if f.name in CRITIC_KEYS}
        set_ = [f"ppo.{k}" for k in CRITIC_KEYS if getattr(p, k) != default[k]]
        if set_:
            raise ConfigError(
                f"ppo.advantage={p.advantage} learns no critic, but {', '.join(set_)} "
                f"{'is' if len(set_) == 1 else 'are'} set: drop {'it' if len(set_) == 1 else 'them'} "
                "or use ppo.advantage=gae"
            )
    if p.mini_batch_size > 0 and (p.rollout_batch_size * p.samples_per_prompt) % p.mini_batch_size:
        raise ConfigError(
            f"ppo.rollout_batch_size x ppo.samples_per_prompt ({p.rollout_batch_size} x "
            f"{p.samples_per_prompt}) must be a multiple of ppo.mini_batch_size ({p.mini_batch_size})"
        )


def build_roles(cfg, device=None) -> Roles:
    """Load the actor, critic, reference and reward for `chatforge ppo` (layout per peft.method)."""
    from chatforge.models.load import pick_device

    device = device or pick_device(cfg.train.device)
    if cfg.peft.method in ("prefix", "prompt"):
        raise ConfigError(
            "ppo needs peft.method lora, qlora or none (the critic's value head reads hidden states)"
        )
    if cfg.ppo.critic_init not in ("base", "reward"):
        raise ConfigError(f"ppo.critic_init must be base or reward (got {cfg.ppo.critic_init!r})")
    cfg = replace(cfg, ppo=replace(cfg.ppo, critic=critic_mode(cfg.ppo)))
    if cfg.ppo.critic == "head" and cfg.ppo.critic_init == "reward":
        raise ConfigError(
            "ppo.critic=head puts a fresh value head on the actor; ppo.critic_init=reward needs ppo.critic=adapter"
        )
    rm = cfg.ppo.reward_model
    if rm and not (Path(rm) / "score_head.safetensors").is_file():
        raise ConfigError(
            f"ppo.reward_model: {rm} has no score_head.safetensors (not a `chatforge rm` output)"
        )
    if cfg.peft.method == "none" or cfg.ppo.layout == "separate":
        if cfg.ppo.critic_init == "reward":
            raise ConfigError("ppo.critic_init=reward needs the lean layout (peft.method lora or qlora)")
        return _separate(cfg, device)
    return _lean(cfg, device)


def _lean(cfg, device) -> Roles:
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    from chatforge.models.adapters import adapter_base, is_adapter_dir, lora_config
    from chatforge.models.heads import ScalarHeadModel, disable_dropout, load_head, normalise_head
    from chatforge.models.load import enable_checkpointing, load_for_training, load_tokenizer
    from chatforge.models.logprobs import LogprobModel
    from chatforge.rl.rewards import ModelReward

    path, pcfg = cfg.model.path, cfg.peft
    from_adapter = is_adapter_dir(path)
    if from_adapter:
        _check_lora(path, "model.path")
    base_path = adapter_base(path) if from_adapter else path
    lm, _ = load_for_training(replace(cfg.model, path=base_path), pcfg.method, device)
    tok = load_tokenizer(path, cfg.model.trust_remote_code)
    if lm.config.pad_token_id is None:
        lm.config.pad_token_id = tok.pad_token_id
    if pcfg.method == "qlora":
        lm = prepare_model_for_kbit_training(lm, use_gradient_checkpointing=cfg.model.gradient_checkpointing)
    elif cfg.model.gradient_checkpointing:
        lm.enable_input_require_grads()
    fresh = lora_config(pcfg, lm, dropout=0.0)
    head_critic = cfg.ppo.critic == "head"
    adapters = {"actor": "actor"} if head_critic else {"actor": "actor", "critic": "critic"}
    notes = {"base": f"{base_path} ({lm.dtype}{', 4-bit' if pcfg.method == 'qlora' else ''}, frozen)"}
    if from_adapter:
        peft = PeftModel.from_pretrained(lm, path, adapter_name="ref", is_trainable=False)
        peft.load_adapter(path, adapter_name="actor", is_trainable=True)
        adapters["ref"] = "ref"
        notes["actor"] = f'adapter "actor", trainable, initialised from {path}'
        notes["ref"] = f'adapter "ref", frozen copy of {path}'
    else:
        peft = get_peft_model(lm, fresh, adapter_name="actor")
        adapters["ref"] = None
        notes["actor"] = f'adapter "actor", trainable, fresh LoRA r={pcfg.r}'
        notes["ref"] = "the base with adapters disabled"

    rm = cfg.ppo.reward_model
    rm_lean = bool(rm) and is_adapter_dir(rm) and _same_path(adapter_base(rm), base_path)
    value_head = None
    if rm_lean:
        _check_lora(rm, "ppo.reward_model")
        peft.load_adapter(rm, adapter_name="reward", is_trainable=False)
        adapters["reward"] = "reward"
        notes["reward"] = f'adapter "reward" + score head from {rm}'
    if cfg.ppo.critic_init == "reward" and rm_lean:
        peft.load_adapter(rm, adapter_name="critic", is_trainable=True)
        value_head, meta = load_head(rm, "score")
        # PPO's rewards are the RM scores normalised with its saved statistics: start the value
        # head in those units, so its first predictions are already the expected reward
        norm = ModelReward(None, meta)
        normalise_head(value_head, norm.mean, norm.std)
        notes["critic"] = f'adapter "critic" + value head, trainable, initialised from {rm}'
    elif head_critic:
        notes["critic"] = "value head on the actor's hidden states (trainable, no gradient into the actor)"
    else:
        if cfg.ppo.critic_init == "reward":
            raise ConfigError(
                "ppo.critic_init=reward needs ppo.reward_model to be a LoRA adapter of the actor's base "
                f"({base_path}); use ppo.critic_init=base"
            )
        peft.add_adapter("critic", fresh)
        notes["critic"] = f'adapter "critic" + value head, trainable, fresh LoRA r={pcfg.r}'
    disable_dropout(peft)
    policy = LogprobModel(peft)
    critic = ScalarHeadModel(peft, value_head or _zero_head(peft), name="value")
    trainable = tuple(n for n, _ in peft.named_parameters() if ".actor." in n or ".critic." in n)
    roles = Roles(
        "lean",
        policy,
        critic,
        tok,
        ref_policy=policy,
        adapters=adapters,
        notes=notes,
        device=device,
        trainable=trainable,
        critic_mode=cfg.ppo.critic,
    )
    if rm_lean:
        head, meta = load_head(rm, "score")
        scorer = ScalarHeadModel(peft, head, name="score")
        roles.reward = ModelReward(
            scorer, meta, switch=partial(roles.use, "reward"), tokenizer=tok, max_length=cfg.data.max_length
        )
    elif rm:
        dtype = None if pcfg.method == "qlora" else lm.dtype
        roles.reward = ModelReward.from_dir(rm, device=device, dtype=dtype, max_length=cfg.data.max_length)
        notes["reward"] = f"separate model {rm} (not a LoRA of {base_path})"
    else:
        notes["reward"] = "rule functions: " + ", ".join(cfg.ppo.reward_functions or ["(none)"])
    if rm and cfg.ppo.reward_functions:
        notes["reward"] += " + rule functions: " + ", ".join(cfg.ppo.reward_functions)
    roles._active = "actor"
    peft.base_model.set_adapter("actor", inference_mode=True)
    roles._fix_grads()
    if cfg.model.gradient_checkpointing:  # after any earlier enabling (QLoRA's), with the adapter replay
        enable_checkpointing(lm, context_fn=roles.checkpoint_contexts)
    return roles


def _zero_head(lm) -> nn.Linear:
    """A value head that starts at 0 everywhere (no random baseline on the first rollouts)."""
    from chatforge.models.heads import hidden_size_of

    head = nn.Linear(hidden_size_of(lm), 1, bias=True, dtype=torch.float32)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


def _separate(cfg, device) -> Roles:
    from chatforge.models.adapters import apply_peft
    from chatforge.models.heads import ScalarHeadModel, disable_dropout
    from chatforge.models.load import enable_checkpointing, load_tokenizer, resolve_dtype
    from chatforge.models.logprobs import LogprobModel
    from chatforge.rl.rewards import ModelReward

    path, lora = cfg.model.path, cfg.peft.method != "none"
    if cfg.peft.method == "qlora":
        raise ConfigError(
            "ppo.layout=separate supports peft.method lora or none; use ppo.layout=auto for qlora"
        )
    tok = load_tokenizer(path, cfg.model.trust_remote_code)
    train_dtype = resolve_dtype(cfg.model.dtype, device, full_finetune=not lora)
    frozen_dtype = resolve_dtype(cfg.model.dtype, device, full_finetune=False)
    park = cfg.ppo.offload_frozen and device.type != "cpu"
    head_critic = cfg.ppo.critic == "head"
    actor = load_full(path, train_dtype, device, cfg.model)
    critic_lm = actor if head_critic else load_full(path, train_dtype, device, cfg.model)
    ref = load_full(path, frozen_dtype, "cpu" if park else device, cfg.model)
    for m in (actor, critic_lm, ref):
        if m.config.pad_token_id is None:
            m.config.pad_token_id = tok.pad_token_id
        disable_dropout(m)
    if cfg.model.gradient_checkpointing:
        for m in (actor, critic_lm):
            enable_checkpointing(m)
    if lora:  # four separate models with adapters: the baseline the lean layout is measured against
        actor = apply_peft(actor, cfg.peft, cfg.model.gradient_checkpointing, dropout=0.0)
        critic_lm = (
            actor
            if head_critic
            else apply_peft(critic_lm, cfg.peft, cfg.model.gradient_checkpointing, dropout=0.0)
        )
    else:
        actor.requires_grad_(True)
        critic_lm.requires_grad_(True)
    ref.eval().requires_grad_(False)
    ref_policy = LogprobModel(ref)
    where = "parked on CPU between uses" if park else "on the device"
    kind = f"fresh LoRA r={cfg.peft.r}" if lora else "full model"
    notes = {
        "actor": f"{path} ({kind}, trainable, {train_dtype})",
        "critic": "value head on the actor's hidden states (trainable, no gradient into the actor)"
        if head_critic
        else f"a second copy of {path} ({kind}) + value head (trainable)",
        "ref": f"a frozen copy of {path} ({frozen_dtype}, {where})",
    }
    reward = None
    offload = [ref_policy] if park else []
    if cfg.ppo.reward_model:
        reward = ModelReward.from_dir(
            cfg.ppo.reward_model, device=device, dtype=frozen_dtype, max_length=cfg.data.max_length
        )
        notes["reward"] = f"separate model {cfg.ppo.reward_model} ({where})"
        if park:
            reward.model.to("cpu")
            offload.append(reward.model)
    else:
        notes["reward"] = "rule functions: " + ", ".join(cfg.ppo.reward_functions or ["(none)"])
    critic = ScalarHeadModel(critic_lm, _zero_head(critic_lm), name="value")
    return Roles(
        "separate",
        LogprobModel(actor),
        critic,
        tok,
        ref_policy=ref_policy,
        reward=reward,
        notes=notes,
        device=device,
        offload=tuple(offload),
        critic_mode=cfg.ppo.critic,
    )
