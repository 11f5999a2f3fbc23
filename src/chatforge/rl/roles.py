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
is active. `Roles.describe()` is printed at start-up. This module is the switch only: loading the
roles in either layout is `chatforge.rl.build.build_roles(cfg)`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from torch import nn

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
        prev=None,
    ):
        """(logps, entropy, values) for one batch, each (B, T-1) and aligned: position t predicts
        token t+1 and values[:, t] is the value of the state that token is sampled from. With
        values=False (an SFT micro-batch) the critic does not run and values is None; entropy is
        None unless asked for. part="actor" runs the actor alone (values None), part="critic" the
        critic alone (logps and entropy None), for a loss backwarded one role at a time. `prev`
        (branched rows, `models.logprobs.token_logprobs`) is taken by the actor and a value head on
        it; a critic of its own reads plain rows only.

        Everything the PPO loss needs goes through this one call, so DDP sees it and syncs gradients;
        experience collection uses it too.
        """
        args = (input_ids, attention_mask, position_ids, target_mask)
        head = self.roles.critic_mode == "head"
        # values are returned as tensors of their own, not views: FSDP2 hooks a sharded root's
        # outputs for its backward and warns about views (an in-place change would skip the hook)
        if part == "critic":
            with self.roles.use("critic"):
                return None, None, self.critic(*args[:3])[:, :-1].clone()
        kw = {} if prev is None else {"prev": prev}
        if prev is not None and not head and values:
            raise ValueError("branched rows (prev) need ppo.critic=head or no values")
        with self.roles.use("actor"):
            if not values:
                return self.policy(*args, **kw)[0], None, None
            out = self.policy(*args, with_entropy=with_entropy, return_hidden=head, **kw)
        if head:  # the value head learns on the actor's features; the actor is not moved by it
            return out[0], out[1], self.critic.read(out[2].detach()).clone()
        if part == "actor":
            return out[0], out[1], None
        with self.roles.use("critic"):
            return out[0], out[1], self.critic(*args[:3])[:, :-1].clone()


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
