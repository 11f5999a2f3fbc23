"""The one training loop every stage shares: accumulate, clip, step, log, checkpoint, resume.

A stage supplies a `loss_fn(model, batch, normalizer) -> (loss, metrics)` and a
`units_fn(batch) -> int` (how many tokens or sequences the loss averages over). Before the
forward passes of an optimizer step the trainer counts the units of every micro-batch on every rank
and hands each loss the global count as `normalizer`, so 4 micro-batches of 1 give exactly the
gradient of 1 micro-batch of 4, and 2 processes give the step of 1 process at the same global batch.

Checkpoints (`OUTPUT/checkpoints/step-N/`, written by `chatforge.train.saving`) hold the trainable
weights, optimizer, scheduler, RNG states, the stage's own state and the run's identity (see
`chatforge.train.checkpoint`: no pickle, ordered by step number, atomic, a one-line error on a full
disk). `train.resume=true` restarts from
the newest and replays the same data order, so the metrics after the resume point equal an
uninterrupted run; a checkpoint of another config is refused, naming the keys that differ, and a
fresh run does not start over another run's checkpoints unless `train.overwrite=true`.

A step whose loss or gradient norm is not finite stops the run with a one-line error before the
optimizer touches the weights: the last good checkpoint is kept and no NaN weights reach `final/`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from chatforge import tracking
from chatforge.errors import ChatforgeError
from chatforge.train import checkpoint as ck
from chatforge.train import dist as sharding
from chatforge.train import zero
from chatforge.train.saving import Saving
from chatforge.train.schedule import epoch_order, lr_lambda

LossFn = Callable[[Any, dict, float | None], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def loss_parts(out) -> Iterator[tuple[torch.Tensor, dict]]:
    """A loss_fn returns (loss, metrics), or yields several of them: a loss in parts whose graphs
    share no activations (PPO's actor and critic adapters). The trainer runs backward on each part
    before asking for the next, so only one part's activations are alive at a time."""
    return iter([out]) if isinstance(out, tuple) else out


def batch_tokens(batch: dict) -> int:
    """Real (non-padding) tokens in a batch."""
    if "num_tokens" in batch:
        return int(batch["num_tokens"])
    if batch.get("attention_mask") is not None:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())


class Trainer(Saving):
    """Optimizer, schedule, accelerate, logging and checkpoints for one training run."""

    def __init__(
        self,
        model: torch.nn.Module,
        tcfg,
        total_steps: int,
        param_groups: list[dict] | Callable[[torch.nn.Module], list[dict] | None] | None = None,
        device=None,
        dist=None,
    ):
        from accelerate import Accelerator, InitProcessGroupKwargs

        from chatforge.models.load import bf16_supported, pick_device

        self.cfg = tcfg
        self.out = Path(tcfg.output_dir)
        self.total_steps = total_steps
        device = device or pick_device(tcfg.device)
        mp = tcfg.mixed_precision
        if mp == "auto":
            wants = any(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
            mp = "bf16" if wants and bf16_supported(device) else "none"
        distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        # CPU processes talk over gloo (DeepSpeed on CPU also needs it, see DESIGN.md)
        handlers = [InitProcessGroupKwargs(backend="gloo")] if distributed and device.type != "cuda" else []
        if not distributed:
            # accelerate keeps its precision settings process-wide; one process may run several
            # stages with different ones (a pipeline, a test session), so start each from scratch
            from accelerate.state import AcceleratorState

            reset = getattr(AcceleratorState, "_reset_state", None)
            if reset is not None:
                reset()
        self.acc = Accelerator(
            mixed_precision="no" if mp == "none" else mp,
            cpu=device.type == "cpu",
            kwargs_handlers=handlers,
            log_with=tracking.log_with(tcfg.report_to, self.out),
        )
        torch.manual_seed(tcfg.seed)
        strategy = sharding.resolve(dist.strategy if dist else "auto", self.acc.num_processes)
        self.sharded = strategy == "fsdp2"
        self.zero = strategy in ("zero2", "zero3")
        self.strategy = strategy
        if self.sharded:  # before the optimizer exists: it must hold the sharded parameters
            model = sharding.shard(model.to(self.acc.device), dist.reshard_after_forward, dist.offload)
        # a callable gives the groups of the model as sharded (fsdp2 replaces the parameters)
        groups = param_groups(model) if callable(param_groups) else param_groups
        groups = groups or [{"params": [p for p in model.parameters() if p.requires_grad]}]
        if not any(g["params"] for g in groups):
            raise ChatforgeError("nothing to train: the model has no trainable parameters")
        opt = torch.optim.AdamW(groups, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
        warmup = math.ceil(tcfg.warmup_ratio * total_steps)
        # the schedule is not prepared: accelerate would step it once per process, and
        # total_steps already counts optimizer steps of the global batch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            opt, lr_lambda(tcfg.scheduler, warmup, total_steps)
        )
        if self.sharded:  # accelerate would wrap the sharded model in DDP on CPU
            self.model, self.optimizer = model, self.acc.prepare(opt)
        elif self.zero:  # accelerate's Accelerator(cpu=True) would drop DeepSpeed: the engine directly
            self.model, self.optimizer = zero.initialize(
                model.to(self.acc.device), opt, strategy, tcfg.batch_size, tcfg.max_grad_norm, dist.offload
            )
        else:
            self.model, self.optimizer = self.acc.prepare(model, opt)
        # what each rank holds is printed once where it is asked about: several processes, or a named
        # dist.strategy (its one-process run is the figure the sharded runs are compared with)
        named = dist is not None and dist.strategy != "auto"
        self._reported_bytes = not (named or self.world > 1)
        self.step = 0
        self._start_step = 0  # metrics logged after this by an earlier run in the same dir are stale
        self._metrics_open = False
        self._tracking = False  # the trackers' run opens at the first log
        self._bar = None
        self._last_log = (time.perf_counter(), 0, 0)  # time, tokens and step of the last log
        self._tokens = 0
        self.identity = self._claim_output_dir()

    # ---- one optimizer step -------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.acc.is_main_process

    @property
    def world(self) -> int:
        return self.acc.num_processes

    def global_sum(self, value: float) -> float:
        if self.world == 1:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.acc.device)
        return float(self.acc.reduce(t, "sum").item())

    def train_step(self, micro_batches: Sequence[dict], loss_fn: LossFn, units_fn) -> dict[str, float]:
        """Forward/backward over the micro-batches, clip, step; returns this step's metrics."""
        self.model.train()
        units = [units_fn(b) for b in micro_batches]
        total = self.global_sum(sum(units))
        # DDP averages gradients over ranks; scale so the result is the global-batch mean.
        normalizer = max(total, 1.0) / self.world
        sums: dict[str, float] = {}
        loss_total = 0.0
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last else self.acc.no_sync(self.model)
            with sync, self.acc.autocast():
                for loss, metrics in loss_parts(loss_fn(self.model, batch, normalizer)):
                    if self.zero:  # no 1/grad_accum scaling: the normalizer already counts it
                        self.model.backward(loss, scale_wrt_gas=False)
                    else:
                        self.acc.backward(loss)
                    loss_total += float(loss.detach())
                    for k, v in metrics.items():
                        sums[k] = sums.get(k, 0.0) + float(v) * units[i]
            self._tokens += batch_tokens(batch)
        grad_norm = None
        if self.zero:  # DeepSpeed's step clips and computes the norm; only the loss is checked first
            loss_sum = self.global_sum(loss_total)
            self._stop_if_diverged(loss_sum, torch.zeros(()))
            self.model.step()
            grad_norm = zero.grad_norm(self.model) if self.cfg.max_grad_norm > 0 else None
        else:
            if self.cfg.max_grad_norm > 0 and self.sharded:
                grad_norm = sharding.clip_grad_norm(self.model.parameters(), self.cfg.max_grad_norm)
            elif self.cfg.max_grad_norm > 0:
                grad_norm = self.acc.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
            loss_sum = self.global_sum(loss_total)
            self._stop_if_diverged(loss_sum, grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        if not self._reported_bytes:
            self._report_bytes()
        out = {"loss": loss_sum / self.world}
        for k, v in sums.items():
            out[k] = self.global_sum(v) / max(total, 1.0)
        if grad_norm is not None:
            out["grad_norm"] = float(grad_norm)
        out["lr"] = self.scheduler.get_last_lr()[0]
        return out

    def _report_bytes(self) -> None:
        """Every rank, after the first step: the parameter and optimizer-state bytes it holds."""
        params, state = sharding.local_bytes(self.acc.unwrap_model(self.model), self.optimizer)
        host = sharding.offloaded(self.model)
        line = (
            f"chatforge: rank {self.acc.process_index}/{self.world} holds {params} parameter bytes "
            f"and {state} optimizer-state bytes"
            + (f", offloaded to host: {' and '.join(host)}" if host else "")
        )
        print(line + "\n", end="", flush=True)  # one write: the ranks' lines do not interleave
        self._reported_bytes = True

    def _stop_if_diverged(self, loss_sum: float, grad_norm) -> None:
        """A non-finite loss or gradient norm ends the run before the optimizer step (one line)."""
        if grad_norm is None:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
            if sharding.is_sharded(grad_norm):
                grad_norm = grad_norm.full_tensor()
        norm = float(grad_norm)
        if math.isfinite(loss_sum) and math.isfinite(norm):
            return
        self.optimizer.zero_grad(set_to_none=True)
        what = f"loss {loss_sum}" if not math.isfinite(loss_sum) else f"gradient norm {norm}"
        ckpts = self.checkpoints()
        kept = f"the last good checkpoint {ckpts[-1]} is kept" if ckpts else "no checkpoint was written yet"
        raise ChatforgeError(
            f"step {self.step + 1}: training diverged ({what}); stopped before updating the weights, "
            f"{kept} and nothing goes to final/: lower train.lr or check the data"
        )

    def _check_weights_finite(self, where: str) -> None:
        model = self.acc.unwrap_model(self.model)
        bad = [
            n
            for n, p in model.named_parameters()
            if p.requires_grad and not torch.isfinite(sharding.local(p)).all()
        ]
        if (
            (self.sharded or self.zero) and self.global_sum(len(bad)) and not bad
        ):  # each rank checks its shards
            bad = ["a shard on another rank"]
        if bad:
            raise ChatforgeError(
                f"{where}: not written, {len(bad)} trained tensors hold NaN or inf (first: {bad[0]})"
            )

    @torch.no_grad()
    def evaluate(self, batches, loss_fn: LossFn, units_fn) -> dict[str, float]:
        """Unit-weighted mean of the loss and metrics over `batches` (this rank's shard)."""
        self.model.eval()
        sums: dict[str, float] = {}
        total = 0.0
        for batch in batches:
            n = units_fn(batch)
            with self.acc.autocast():
                parts = list(loss_parts(loss_fn(self.model, batch, None)))
            merged = {"loss": sum(float(loss) for loss, _ in parts)}
            for _, metrics in parts:
                merged.update(metrics)
            for k, v in merged.items():
                sums[k] = sums.get(k, 0.0) + float(v) * n
            total += n
        total = self.global_sum(total)
        return {f"eval/{k}": self.global_sum(v) / max(total, 1.0) for k, v in sums.items()}

    # ---- logging --------------------------------------------------------------------------
    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        step = self.step if step is None else step
        now = time.perf_counter()
        t0, tok0, step0 = self._last_log
        tokens = self.global_sum(self._tokens - tok0)
        self._last_log = (now, self._tokens, step)
        record = {"step": step, **metrics}
        if "eval/loss" not in metrics:
            record["tokens_per_s"] = round(tokens / max(now - t0, 1e-9), 1)
            record["step_s"] = round((now - t0) / max(step - step0, 1), 3)  # wall seconds per step
        if not self.is_main:
            return
        if not self._metrics_open:
            # a fresh run in a used dir replaces the old curve instead of appending to it
            ck.truncate_log(self.out / "metrics.jsonl", self._start_step)
            self._metrics_open = True
        path = self.out / "metrics.jsonl"
        with ck.writing(path, "the metrics", temporary=False), open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if not self._tracking:
            tracking.start(self.acc, self.cfg.project, self.out, self.identity or {})
            self._tracking = True
        self.acc.log(
            {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}, step=step
        )
        if self._bar is not None:
            shown = {
                k: f"{v:.4g}"
                for k, v in record.items()
                if k in ("loss", "eval/loss", "reward", "tokens_per_s")
            }
            self._bar.set_postfix(shown, refresh=False)

    def progress(self, initial: int = 0, desc: str = "train"):
        from tqdm.auto import tqdm

        self._bar = tqdm(
            total=self.total_steps,
            initial=initial,
            desc=desc,
            disable=not (self.cfg.progress and self.is_main),
        )
        return self._bar

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tracking:
            tracking.finish(self.acc)
            self._tracking = False

    # ---- the supervised loop ---------------------------------------------------------------
    def fit(
        self,
        items: Sequence,
        collate: Callable[[list], dict],
        loss_fn: LossFn,
        units_fn: Callable[[dict], int],
        eval_items: Sequence | None = None,
        on_step: Callable[[Trainer, dict], None] | None = None,
    ) -> dict[str, float]:
        """Train over `items` (reshuffled each epoch) for `total_steps`; returns the last metrics."""
        cfg = self.cfg
        per_step = cfg.batch_size * cfg.grad_accum * self.world
        steps_per_epoch = len(items) // per_step
        rank = self.acc.process_index
        start = 0
        if cfg.resume and (state := self.resume()) is not None:
            start = state["step"]
            if self.is_main:
                print(f"chatforge: resumed from step {start}", flush=True)
        last: dict[str, float] = {}
        bar = self.progress(initial=start)
        try:
            for step in range(start, self.total_steps):
                epoch, pos = divmod(step, steps_per_epoch)
                order = epoch_order(len(items), cfg.seed, epoch)
                base = pos * per_step
                micro = []
                for k in range(cfg.grad_accum):
                    lo = base + (k * self.world + rank) * cfg.batch_size
                    micro.append(
                        self._to_device(collate([items[i] for i in order[lo : lo + cfg.batch_size]]))
                    )
                last = self.train_step(micro, loss_fn, units_fn)
                last["epoch"] = round(self.step / steps_per_epoch, 4)
                done = self.step == self.total_steps
                if eval_items and ((cfg.eval_every and self.step % cfg.eval_every == 0) or done):
                    last.update(self.evaluate(self.eval_batches(eval_items, collate), loss_fn, units_fn))
                if on_step is not None:
                    on_step(self, last)
                if self.step % cfg.log_every == 0 or done:
                    self.log(last)
                bar.update(1)
                if (cfg.save_every and self.step % cfg.save_every == 0) or done:
                    self.save_checkpoint({"epoch": epoch})
        except KeyboardInterrupt:
            if self.step > start:
                self.save_checkpoint({"interrupted": True})
                print(
                    f"\nchatforge: interrupted; saved checkpoint at step {self.step} (train.resume=true continues)"
                )
            raise
        finally:
            self.close()
        return last

    def eval_batches(self, items: Sequence, collate):
        rank, bs = self.acc.process_index, self.cfg.batch_size
        mine = list(range(rank, len(items), self.world))
        for s in range(0, len(mine), bs):
            yield self._to_device(collate([items[i] for i in mine[s : s + bs]]))

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.acc.device) if torch.is_tensor(v) else v for k, v in batch.items()}
