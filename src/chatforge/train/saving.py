"""Where a training run's work lands: its output dir, checkpoints, resume, and `final/`.

The half of `chatforge.train.loop.Trainer` that writes and reads a run's files, split off by
responsibility (the trainer inherits it). Checkpoints (`OUTPUT/checkpoints/step-N/`) hold the
trainable weights, optimizer (one file, or one part per rank under fsdp2 / ZeRO), scheduler, RNG
states, the stage's own state and the run's identity; each is written to a temporary dir and moved
into place, so an interrupted save never replaces good work (`chatforge.train.checkpoint`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from chatforge.errors import ChatforgeError
from chatforge.train import checkpoint as ck
from chatforge.train import dist as sharding
from chatforge.train import zero


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


class Saving:
    """Output dir, checkpoints, resume and final save of a `Trainer` (which sets `acc`, `cfg`,
    `out`, `model`, `optimizer`, `scheduler`, `step`, `world`, `strategy`, `sharded`, `zero`)."""

    def _claim_output_dir(self) -> dict | None:
        """Check the output dir against this run, then write the run's config into it: called once
        the model and data are loaded and checked, so a run that fails earlier leaves no trace."""
        from chatforge.train.common import pending_run

        run = pending_run(self.out)
        identity = run.identity if run else None
        if self.is_main:
            ck.recover_dir(self.out / "final")
        ckpts = self.checkpoints()
        if ckpts and self.cfg.resume:
            saved = ck.read_state(ckpts[-1]).get("identity")
            if identity is not None and saved is not None and saved != identity:
                raise ChatforgeError(
                    f"{ckpts[-1]}: a checkpoint of another run; it differs in "
                    + "; ".join(ck.differences(saved, identity))
                    + ": resume with that run's config, or start afresh with train.overwrite=true "
                    "(deletes its checkpoints)"
                )
        elif ckpts and not self.cfg.overwrite:
            raise ChatforgeError(
                f"{self.out} holds checkpoints of an earlier run (newest {ckpts[-1].name}): continue "
                "it with train.resume=true, or start afresh with train.overwrite=true (deletes them)"
            )
        self.acc.wait_for_everyone()
        if self.is_main:
            if ckpts and not self.cfg.resume:  # train.overwrite=true
                for name in ("checkpoints", "final", "tensorboard"):
                    shutil.rmtree(self.out / name, ignore_errors=True)
                for name in ("metrics.jsonl", "samples.jsonl"):
                    (self.out / name).unlink(missing_ok=True)
            with ck.writing(self.out, "the run's config", temporary=False):
                self.out.mkdir(parents=True, exist_ok=True)
                if run is not None:
                    run.write(self.out)
        self.acc.wait_for_everyone()
        return identity

    @property
    def ckpt_root(self) -> Path:
        return self.out / "checkpoints"

    def save_checkpoint(self, extra: dict | None = None) -> Path:
        """Write `checkpoints/step-N` atomically and keep the newest `train.keep_last`."""
        from safetensors.torch import save_file

        final = self.ckpt_root / f"step-{self.step}"
        tmp = self.ckpt_root / f".tmp-step-{self.step}"
        self._check_weights_finite(str(final))
        self.acc.wait_for_everyone()
        model = self.acc.unwrap_model(self.model)
        with self._whole(model):
            if self.is_main:
                with ck.writing(tmp, "the checkpoint"):
                    shutil.rmtree(tmp, ignore_errors=True)
                    tmp.mkdir(parents=True)
                    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
                    if not (self.sharded or self.zero):  # those save per rank, below
                        ck.save_plain(self.optimizer.state_dict(), tmp / "optimizer.pt")
                    ck.save_plain(self.scheduler.state_dict(), tmp / "scheduler.pt")
                    state = {
                        "step": self.step,
                        "world": self.world,
                        **(extra or {}),
                        "identity": self.identity,
                    }
                    (tmp / "state.json").write_text(json.dumps(state, indent=1))
        self.acc.wait_for_everyone()
        rank = self.acc.process_index
        with ck.writing(tmp, "the checkpoint"):
            ck.save_plain(ck.rng_state(), tmp / f"rng-{rank}.pt")
            if self.sharded:  # each rank's optimizer shard
                ck.save_plain(sharding.local_optimizer_state(self.optimizer), tmp / f"optimizer-{rank}.pt")
            elif self.zero:  # each rank's ZeRO partition (its fp32 master weights and Adam state)
                ck.save_plain(zero.partition_state(self.optimizer), tmp / f"optimizer-{rank}.pt")
        self.acc.wait_for_everyone()
        if self.is_main:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            ck.prune(self.ckpt_root, self.cfg.keep_last)
        self.acc.wait_for_everyone()
        return final

    def _whole(self, model):
        """A block in which a sharded model's parameters are whole (all ranks enter it)."""
        if self.zero:
            return zero.gathered(model)
        return sharding.gathered(model) if self.sharded else contextlib.nullcontext(model)

    def checkpoints(self) -> list[Path]:
        return ck.step_dirs(self.ckpt_root)

    def resume(self) -> dict | None:
        """Load the newest checkpoint (if any); returns its saved state."""
        from safetensors.torch import load_file

        ckpts = self.checkpoints()
        if not ckpts:
            return None
        path = ckpts[-1]
        state = ck.read_state(path)
        try:
            weights = load_file(str(path / "trainable.safetensors"))
        except Exception as e:  # safetensors raises its own error types for a damaged file
            raise ChatforgeError(f"{path / 'trainable.safetensors'}: unreadable ({e})") from None
        model = self.acc.unwrap_model(self.model)
        missing = set(trainable_state(model)) - set(weights)
        if missing:
            raise ChatforgeError(
                f"{path}: checkpoint lacks {len(missing)} trainable tensors (another config?)"
            )
        per_rank = not (path / "optimizer.pt").is_file()  # fsdp2 and zero save a part per rank
        if per_rank and state.get("world") != self.world:
            raise ChatforgeError(
                f"{path}: a checkpoint of {state.get('world')} processes, each saving its optimizer "
                f"shard; resume it with {state.get('world')} processes (this run has {self.world})"
            )
        if self.strategy != "zero3":  # zero3's parameter partitions come from its optimizer's
            sharding.load_full(model, weights)
        if self.sharded or self.zero:
            opt_state = ck.load_plain(path / f"optimizer-{self.acc.process_index}.pt")
            if self.zero:
                zero.load_partition_state(self.optimizer, opt_state, self.acc.process_index, self.world)
            else:
                sharding.load_local_optimizer_state(self.optimizer, opt_state)
        else:
            self.optimizer.load_state_dict(ck.load_plain(path / "optimizer.pt"))
        self.scheduler.load_state_dict(ck.load_plain(path / "scheduler.pt"))
        rng = path / f"rng-{self.acc.process_index}.pt"
        if rng.is_file():
            ck.set_rng_state(ck.load_plain(rng))
        self.step = self._start_step = state["step"]
        self._last_log = (self._last_log[0], self._last_log[1], self.step)  # step_s counts from here
        if self.is_main:
            ck.truncate_log(self.out / "metrics.jsonl", self.step)
        return state

    def save_final(self, save_fn: Callable[[Path], None]) -> Path:
        """Call `save_fn(tmp_dir)` on the main process, then atomically move it to OUTPUT/final."""
        from chatforge.card import write_card

        final = self.out / "final"
        self._check_weights_finite(str(final))
        self.acc.wait_for_everyone()
        with self._whole(self.acc.unwrap_model(self.model)):
            if self.is_main:
                tmp = self.out / ".tmp-final"
                with ck.writing(tmp, "the final model"):
                    shutil.rmtree(tmp, ignore_errors=True)
                    save_fn(tmp)
                    write_card(tmp, self.out)  # in place of peft's empty template
                ck.replace_dir(tmp, final)
        self.acc.wait_for_everyone()
        return final
