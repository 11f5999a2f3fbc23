"""The four PPO roles (actor, critic, reference, reward) and where they live in memory.

Classic PPO holds four models. With LoRA/QLoRA chatforge holds ONE frozen base and switches adapters:

    lean layout (peft.method lora | qlora)          one base B in memory
      actor      B + "actor" LoRA                   trainable; the SFT adapter's weights when
                                                    model.path is an SFT adapter dir, else fresh
      reference  B + "ref" LoRA (frozen)            when model.path is an adapter dir (the SFT policy)
                 B with adapters disabled           when model.path is a full model (B itself)
      critic     B + "critic" LoRA + value head     trainable; fresh, or the reward adapter + score
                                                    head when ppo.critic_init=reward and the RM is
                                                    a LoRA of B
      reward     B + "reward" LoRA + score head     when ppo.reward_model is a LoRA adapter of B
                 a separate model                   any other reward model dir
                 nothing                            rule rewards only (ppo.reward_functions)

    separate layout (peft.method none, full fine-tuning; or ppo.layout=separate with LoRA, the
    four-model baseline): actor, critic (+ value head), a frozen reference copy and the reward model
    are separate models; ppo.offload_frozen parks the frozen ones on CPU and brings each to the
    device only while it runs.

`Roles.use(role)` is the switch: a context manager that activates the role's adapter (peft
`set_adapter`, or `disable_adapter()` for the bare base) and restores the previous one. peft's
`set_adapter` also flips `requires_grad` (active adapter trainable, the rest frozen); the switch
puts it back so the actor and critic adapters stay trainable and ref/reward stay frozen whatever
is active. `build_roles(cfg)` loads everything and `Roles.describe()` is printed at start-up.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
from torch import nn

from chatforge.errors import ConfigError

ROLES = ("actor", "critic", "ref", "reward")


class PPOModel(nn.Module):
    """The trainable part handed to the Trainer: the actor (log-probs) and the critic (values).

    In the lean layout both wrap the same peft model, so the base weights appear once.
    `roles` is the switch the loss uses to run each of them with its own adapter.
    """

    def __init__(self, policy, critic, roles: Roles):
        super().__init__()
        self.policy = policy  # LogprobModel
        self.critic = critic  # ScalarHeadModel(name="value")
        object.__setattr__(self, "roles", roles)  # not a submodule: it holds references only

    def forward(
        self,
        input_ids,
        attention_mask,
        position_ids,
        target_mask,
        values: bool = True,
        with_entropy: bool = True,
        part: str | None = None,
    ):
        """(logps, entropy, values) for one batch, each (B, T-1) and aligned: position t predicts
        token t+1 and values[:, t] is the value of the state that token is sampled from. With
        values=False (an SFT micro-batch) the critic does not run and values is None; entropy is
        None unless asked for. part="actor" runs the actor alone (values None), part="critic" the
        critic alone (logps and entropy None), for a loss backwarded one role at a time.

        Everything the PPO loss needs goes through this one call, so DDP sees it and syncs gradients;
        experience collection uses it too.
        """
        args = (input_ids, attention_mask, position_ids, target_mask)
        head = self.roles.critic_mode == "head"
        if part == "critic":
            with self.roles.use("critic"):
                return None, None, self.critic(*args[:3])[:, :-1]
        with self.roles.use("actor"):
            if not values:
                return self.policy(*args)[0], None, None
            out = self.policy(*args, with_entropy=with_entropy, return_hidden=head)
        if head:  # the value head learns on the actor's features; the actor is not moved by it
            return out[0], out[1], self.critic.read(out[2].detach())
        if part == "actor":
            return out[0], out[1], None
        with self.roles.use("critic"):
            return out[0], out[1], self.critic(*args[:3])[:, :-1]


@dataclass
class Roles:
    """Where each role lives and how to switch to it (see the module docstring)."""

    layout: str  # "lean" | "separate"
    policy: object  # LogprobModel of the actor
    critic: object  # ScalarHeadModel(name="value")
    tokenizer: object
    ref_policy: object | None = None  # LogprobModel; the policy itself in the lean layout
    reward: object | None = None  # ModelReward or None (rule rewards only)
    adapters: dict = field(default_factory=dict)  # role -> adapter name; None = adapters disabled
    notes: dict = field(default_factory=dict)  # role -> human description
    device: object = None
    offload: tuple = ()  # separate layout: modules parked on CPU between uses
    trainable: tuple = ()  # parameter names that must stay trainable
    critic_mode: str = "adapter"  # "head": the value head reads the actor's hidden states
    _active: str | None = None
    _disabled: bool = False  # inside use() of a role that runs the bare base

    @property
    def peft(self):
        return self.policy.lm if self.layout == "lean" else None

    def model(self) -> PPOModel:
        return PPOModel(self.policy, self.critic, self)

    @contextlib.contextmanager
    def use(self, role: str):
        """Run the body as `role`: activate its adapter (lean) or bring its model to the device."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; known: {', '.join(ROLES)}")
        if self.layout != "lean":
            with self._on_device(role):
                yield
            return
        name = self.adapters.get(role)
        prev = self._active
        if name is None and role in ("ref",):
            with self._bare():
                yield
            return
        self._activate(name)
        try:
            yield
        finally:
            self._activate(prev)

    @contextlib.contextmanager
    def _bare(self):
        with self.peft.disable_adapter():
            self._fix_grads()
            self._disabled = True
            try:
                yield
            finally:
                self._disabled = False
                self._fix_grads()

    def checkpoint_contexts(self):
        """`context_fn` for torch.utils.checkpoint in the lean layout: a checkpointed layer is
        recomputed during backward under the adapter it first ran with, not whichever role is
        active by then (the actor's layers would otherwise be replayed with the critic's adapter)."""
        name, bare = self._active, self._disabled

        @contextlib.contextmanager
        def replay():
            if bare == self._disabled and (bare or name == self._active):
                yield
                return
            prev = self._active
            with self._bare() if bare else contextlib.nullcontext():
                self._activate(name)
                try:
                    yield
                finally:
                    self._activate(prev)

        return contextlib.nullcontext(), replay()

    def _activate(self, name: str | None) -> None:
        if name is None or name == self._active:
            return
        self.peft.base_model.set_adapter(name, inference_mode=True)
        self._active = name
        self._fix_grads()

    def _fix_grads(self) -> None:
        for n, p in self.peft.named_parameters():
            if "lora_" in n:
                p.requires_grad_(n in self.trainable)

    @contextlib.contextmanager
    def _on_device(self, role: str):
        module = {"ref": self.ref_policy, "reward": getattr(self.reward, "model", None)}.get(role)
        if module is None or module not in self.offload or self.device is None:
            yield
            return
        module.to(self.device)
        try:
            yield
        finally:
            module.to("cpu")

    def describe(self) -> str:
        head = {
            "lean": "lean (one frozen base in memory, adapters switched per role)",
            "separate": "separate models (full fine-tuning)",
        }[self.layout]
        lines = [f"PPO layout: {head}"]
        lines += [f"  {role:<10}{self.notes[role]}" for role in ("base", *ROLES) if role in self.notes]
        return "\n".join(lines)


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


def load_full(path: str, dtype, device, mcfg):
    """A full causal LM from a model dir, or an adapter dir merged into its base."""
    from chatforge.models.adapters import is_adapter_dir, load_adapter_model
    from chatforge.models.load import load_model

    if is_adapter_dir(path):
        return load_adapter_model(path, dtype=dtype, device=device).merge_and_unload()
    return load_model(
        path,
        dtype=dtype,
        device=device,
        trust_remote_code=mcfg.trust_remote_code,
        attn_implementation=mcfg.attn_implementation,
    )


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
