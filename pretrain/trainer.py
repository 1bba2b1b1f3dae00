"""One rank's training run: the ``Trainer``.

Flow: resume point → module + DeepSpeed engine → loaders → loop of optimizer steps with schedule,
EMA, metrics, periodic evaluation and checkpoints → final checkpoint and evaluation. SIGTERM or
SIGUSR1 on any rank makes all ranks checkpoint and return. Pretraining (``train.py``) runs one;
fine-tuning (``finetuning.py``) one per stage.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
import time

import numpy as np
import torch

from internimage.ops import use_reference
from internimage.data import SKIP_REASONS, DeviceTransform, Tokenizer, build_train_loader

from .checkpoint import (CheckpointWriteError, checkpoint_root, ema_shards, folder_bytes, load_checkpoint,
                         prepare_universal, resolve_resume, save_checkpoint)
from .config import ConfigError, PretrainConfig, save_config
from .configio import to_dict
from .distributed import (PREEMPTION, all_ranks, broadcast_object, compute_device, leave_distributed,
                          mean_over_ranks, precision_dtype, rank, sum_over_ranks, synchronize, world_size)
from .ema import ShardedEMA, assemble_full_ema, local_master_fp32
from .engine import build_engine, build_module, scaled_lr
from .evaluation import Evaluator
from .files import RunFolderLocked, RunLock, clear_preemption, record_preemption
from .guards import NonFiniteError, gradients_finite, tensors_finite, unpadded
from .metrics import (MetricsWriter, ProgressLine, device_memory_stats, device_peak_tflops, log_caption_tokens,
                      peak_memory_gib, reset_peak_memory, train_tflops_per_image)
from .optim import Schedule, set_lr
from .state import Progress, RandomState, RankState, RunState

__all__ = ["Trainer"]


def _new_window() -> dict:
    """Counters of one logging window: start time, data wait and paused (eval/save) seconds, steps."""
    return {"t0": time.perf_counter(), "wait": 0.0, "paused": 0.0, "steps": 0}


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    """One rank's training run of ``cfg``; ``run()`` returns the process exit code."""

    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg
        self.rank, self.world = rank(), world_size()
        self.is_main = self.rank == 0
        self.device = compute_device()
        self.dtype = precision_dtype(cfg.deepspeed.precision)
        self.progress = Progress()
        self.preemption = PREEMPTION.install()
        self.root = checkpoint_root(cfg.run_dir)
        self.run_lock = RunLock(cfg.run_dir) if self.is_main else None
        point = self._claim_run_dir()
        # Resumed from this run's own checkpoint: its step is already on disk here.
        self.saved_step = point.state.step if point is not None and \
            os.path.abspath(point.root) == os.path.abspath(self.root) else None
        resharding = point is not None and (point.world_size != self.world or cfg.checkpoint.universal)
        _seed_everything(cfg.seed)
        tokenizer = Tokenizer(cfg.data.context_length, cfg.data.tokenizer) \
            if cfg.objective.kind != "supervised" else None
        module = build_module(cfg, tokenizer.vocab_size if tokenizer else None)
        self.macs_per_image = self._model_report(module.image)
        self.engine, self.optimizer, self.step_gate = build_engine(
            cfg, module, self.world, load_universal=resharding,
            config_out=os.path.join(cfg.run_dir, "ds_config.json"))
        # The weights are identical on every rank by now; from here on each rank draws its own
        # stochastic depth and dropout masks (the same seed would drop the same branches for
        # sample i of every rank's micro-batch).
        torch.manual_seed(cfg.seed + 7919 * (self.rank + 1))
        self.ema = ShardedEMA(self.engine.module, cfg.ema.decay) if cfg.ema.enabled else None
        # Draws the per-batch augmentation seeds on the host (a draw on the GPU would stop the host
        # for the device every batch); the device-side noise has its own generator, seeded by them.
        self.generator = torch.Generator()
        self.generator.manual_seed(cfg.seed * 1000 + self.rank)
        self.random_state = RandomState(self.generator)
        loader_state = self._resume(point, resharding) if point is not None else None
        # Pinned host batches let the copy to the GPU overlap compute (non_blocking below).
        data_cfg = dataclasses.replace(cfg.data, pin_memory=cfg.data.pin_memory or self.device.type == "cuda")
        self.loader = build_train_loader(data_cfg, self.rank, self.world, state=loader_state,
                                         num_classes=cfg.model.num_classes)
        self.transform = DeviceTransform(cfg.data, cfg.model.num_classes)
        self.evaluator = Evaluator(cfg, self.rank, self.world, self.device, self.dtype)
        global_batch = cfg.data.batch_size * cfg.optim.grad_accum * self.world
        schedule_batch = (point.state.run_schedule_batch() if point is not None else None) or global_batch
        self.schedule = Schedule.from_config(cfg.schedule, self.loader.epoch_samples, schedule_batch)
        self.total_steps = self.progress.step + self.schedule.steps_left(self.progress.samples, global_batch)
        if self.is_main:
            print(f"schedule: {self.schedule.total_samples:,} samples, warm-up {self.schedule.warmup_samples:,} "
                  f"(read at a global batch of {schedule_batch}); {self.total_steps - self.progress.step:,} "
                  f"steps of {global_batch} images to go", flush=True)
        self.peak_lr = scaled_lr(cfg, self.world)
        self.metrics = MetricsWriter(cfg.run_dir, self.is_main, cfg.logging.tensorboard,
                                     resumed_at=self.progress.step, wandb=cfg.logging.wandb, config=to_dict(cfg))
        if self.is_main and tokenizer is not None:
            log_caption_tokens(self.metrics, self.progress.step, cfg.data, tokenizer)
        self.peak_tflops = device_peak_tflops(cfg.logging.peak_tflops)
        self.checkpoint_gib = None  # size of one checkpoint, all ranks (measured at the first save)

    # -- set-up helpers ----------------------------------------------------------------------
    def _claim_run_dir(self):
        """Rank 0 takes the run folder's lock and resolves the resume point; every rank learns
        both, and confirms it sees rank 0's folder (the lock's nonce). Refusals exit 2 on all ranks."""
        cfg = self.cfg
        refusal = nonce = point = error = None
        if self.is_main:
            os.makedirs(cfg.run_dir, exist_ok=True)
            try:
                nonce = self.run_lock.acquire()["nonce"]
            except RunFolderLocked as exc:
                refusal = str(exc)
            if refusal is None:
                clear_preemption(cfg.run_dir)
                os.makedirs(self.root, exist_ok=True)
                save_config(cfg, os.path.join(cfg.run_dir, "config.yaml"))
                try:
                    point = resolve_resume(cfg.checkpoint.resume, cfg.run_dir)
                except ConfigError as exc:
                    error = str(exc)
        refusal, nonce, point, error = broadcast_object((refusal, nonce, point, error))
        if refusal is not None:
            self._refuse(refusal)
        seen = RunLock.read(cfg.run_dir)
        sees_it = (seen or {}).get("nonce") == nonce
        if not all_ranks(sees_it):
            self._refuse(
                f"run_dir {os.path.abspath(cfg.run_dir)} is not one folder shared by every rank (at least "
                f"one rank does not see the lock rank 0 just wrote there{'' if sees_it else ', this one'}). "
                "run_dir must be on a filesystem every node shares, not a node-local disk.")
        if error is not None:
            raise ConfigError(error)
        return point

    def _refuse(self, message: str) -> None:
        """Every rank leaves with ``message`` and exit code 2 (collective)."""
        print(f"rank {self.rank}: refusing to start: {message}", file=sys.stderr, flush=True)
        if self.run_lock is not None:
            self.run_lock.release()
        leave_distributed()
        raise SystemExit(2)

    def _model_report(self, image_model) -> int | None:
        """fvcore FLOP/parameter report (rank 0, saved as JSON); returns MACs per image."""
        if not self.is_main:
            return None
        from internimage.model import model_report
        report = model_report(image_model, self.cfg.data.img_size)
        with open(os.path.join(self.cfg.run_dir, "model_report.json"), "w") as f:
            json.dump(report, f, indent=1)
        print(f"model {self.cfg.model.name}: {report['params'] / 1e6:.2f}M parameters, "
              f"{report['flops'] / 1e9:.3f} GMACs/image at {self.cfg.data.img_size}px", flush=True)
        return int(report["flops"])

    def _resume(self, point, resharding: bool) -> dict:
        """Loads ``point`` into the engine, progress, RNG and EMA; returns the loader's state."""
        universal_dir = prepare_universal(point, self.root, self.cfg.checkpoint.universal_timeout_minutes * 60) \
            if resharding else None
        rank_state = load_checkpoint(self.engine, point, universal_dir)
        self.progress.load_state_dict(point.state.progress.state_dict())
        if not resharding:  # another world size: other ranks, other streams
            self.random_state.load_state_dict(rank_state.rng)
        if self.ema is not None:
            if rank_state.ema is None:
                raise ConfigError(f"ema.enabled is true but checkpoint {point.tag_dir} holds no EMA; "
                                  "set ema.enabled=false or start a new run_dir.")
            if resharding:
                full, updates = assemble_full_ema(ema_shards(point))
                self.ema.load_resharded(full, updates)
            else:
                self.ema.load_state_dict(rank_state.ema)
        if self.is_main:
            print(f"resumed from {point.tag_dir} at step {self.progress.step}"
                  + (f" (world size {point.world_size} → {self.world}, universal)" if resharding else ""),
                  flush=True)
        return rank_state.loader

    # -- the loop ----------------------------------------------------------------------------
    def _device_batch(self, batch: dict) -> dict:
        on_device = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        return self.transform(on_device, generator=self.generator)

    def _forward(self, batch: dict) -> dict:
        with use_reference(self.cfg.model.dcn_reference):
            return self.engine(image=batch["image"].to(self.dtype), target=batch["target"],
                               label=batch["label"], text=batch["text"])

    def _optimizer_step(self, batches) -> tuple[dict, float]:
        """One optimizer step over ``grad_accum`` finite micro-batches whose gradients are finite;
        returns (this rank's mean losses as device tensors, data wait s)."""
        set_lr(self.optimizer, self.schedule.lr(self.progress.samples, self.peak_lr, self.cfg.optim.min_lr,
                                                self.cfg.optim.warmup_lr))
        accum = self.cfg.optim.grad_accum
        sums: dict[str, torch.Tensor] = {}
        wait, done = 0.0, 0
        while done < accum:
            t0 = time.perf_counter()
            host_batch = next(batches)
            wait += time.perf_counter() - t0  # the host waiting for the loader, not device work
            out = self._forward(self._device_batch(host_batch))
            if not all_ranks(torch.isfinite(out["loss"].detach())):
                self._count_nonfinite("loss", "losses", "micro-batch")
                continue
            self.engine.backward(out["loss"])
            done += 1
            boundary = done == accum
            # fp16: DeepSpeed's loss scaler owns overflow (it skips the step and lowers the scale).
            skip = boundary and self.dtype != torch.float16 and not gradients_finite(self.engine.module)
            self.step_gate.closed = skip
            self.engine.step()
            self.step_gate.closed = False
            if skip:  # the accumulated gradients are gone: the whole step starts again
                self._count_nonfinite("gradient norm", "gradient norms", "step")
                sums, done = {}, 0
                continue
            for key in ("loss", "supervised", "contrastive", "logit_scale"):
                if key in out:
                    sums[key] = sums.get(key, 0.0) + out[key].detach().float() / accum
        self.progress.nonfinite_streak = 0
        self.progress.step += 1
        self.progress.samples += self.cfg.data.batch_size * accum * self.world
        if self.ema is not None and self.engine.was_step_applied():
            self.ema.update()
        return sums, wait

    def _count_nonfinite(self, what: str, plural: str, dropped: str) -> None:
        self.progress.skipped_steps += 1
        self.progress.nonfinite_streak += 1
        if self.is_main:
            print(f"non-finite {what} in step {self.progress.step + 1}: {dropped} skipped "
                  f"({self.progress.nonfinite_streak} in a row)", flush=True)
        if self.progress.nonfinite_streak >= self.cfg.schedule.max_nonfinite_steps:
            raise NonFiniteError(
                f"{self.progress.nonfinite_streak} consecutive non-finite {plural} in step "
                f"{self.progress.step + 1}; lower optim.lr, raise warm-up, or check the data.")

    def run(self) -> int:
        """The training loop; the run folder's lock is released when it ends, however it ends."""
        try:
            return self._run()
        finally:
            if self.run_lock is not None:
                self.run_lock.release()

    def _run(self) -> int:
        cfg = self.cfg
        progress_line = ProgressLine(self.total_steps, self.progress.step,
                                     self.is_main and cfg.logging.progress_bar)
        batches = iter(self.loader)
        self.engine.train()
        window = _new_window()
        while self.progress.step < self.total_steps:
            if self.preemption.agreed():
                if self.saved_step != self.progress.step:  # never rewrite the checkpoint `latest` names
                    self.save()
                if self.is_main:
                    record_preemption(cfg.run_dir, step=self.progress.step)
                    print(f"preempted: checkpoint saved at step {self.progress.step}, exiting", flush=True)
                self.metrics.close()
                return 0
            losses, wait = self._optimizer_step(batches)
            window["wait"] += wait
            window["steps"] += 1
            step = self.progress.step
            if step % cfg.logging.every_steps == 0 or step == self.total_steps:
                self._log(losses, window, progress_line)
                window = _new_window()
            t0 = time.perf_counter()
            if self._periodic_eval_and_save(step):
                synchronize()
                window["paused"] += time.perf_counter() - t0  # not training throughput
        progress_line.close()
        if self.saved_step != self.progress.step:
            self.save()
        if cfg.eval.at_end:
            self.evaluate()
        self.metrics.close()
        return 0

    def _periodic_eval_and_save(self, step: int) -> bool:
        """The evaluation and checkpoint due after ``step``; True when either ran."""
        cfg = self.cfg
        evaluate = bool(cfg.eval.every_steps) and step % cfg.eval.every_steps == 0 and step < self.total_steps
        save = bool(cfg.checkpoint.every_steps) and step % cfg.checkpoint.every_steps == 0
        if evaluate:
            self.evaluate()
        if save:
            self.save()
        return evaluate or save

    # -- observability -----------------------------------------------------------------------
    def _log(self, losses: dict, window: dict, progress_line: ProgressLine) -> None:
        synchronize()  # the window's kernels are done before its clock is read
        elapsed = time.perf_counter() - window["t0"] - window["paused"]
        images = window["steps"] * self.cfg.data.batch_size * self.cfg.optim.grad_accum * self.world
        skips = sum_over_ranks([self.loader.skip_counts().get(r, 0) for r in SKIP_REASONS])
        losses = mean_over_ranks({k: float(v) for k, v in losses.items()})
        grad_norm = self.engine.get_global_grad_norm()
        per_device = images / elapsed / self.world if elapsed > 0 else 0.0
        scalars = {
            **{f"loss/{k}" if k != "logit_scale" else k: v for k, v in losses.items()},
            "lr": self.optimizer.param_groups[0]["lr"] / self.optimizer.param_groups[0].get("lr_scale", 1.0),
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "images_per_s": images / elapsed if elapsed > 0 else 0.0,
            "images_per_s_per_device": per_device,
            "data_wait_fraction": window["wait"] / elapsed if elapsed > 0 else 0.0,
            "peak_memory_gib": peak_memory_gib(),
            **{f"memory/{k}": v for k, v in device_memory_stats().items()},
            "samples_seen": self.progress.samples,
            "skipped_steps": self.progress.skipped_steps,
            **{f"skipped_samples/{r}": int(v) for r, v in zip(SKIP_REASONS, skips)},
        }
        if self.macs_per_image:
            tflops = per_device * train_tflops_per_image(self.macs_per_image)
            scalars["tflops_per_device"] = tflops
            if self.peak_tflops:
                scalars["mfu"] = tflops / self.peak_tflops
        self.metrics.write(self.progress.step, scalars)
        reset_peak_memory()
        progress_line.update(self.progress.step, {
            "loss": losses.get("loss"), "lr": scalars["lr"], "img/s": scalars["images_per_s"],
            "mfu": scalars.get("mfu")})

    # -- evaluation and checkpoints ------------------------------------------------------------
    def _eval_forward(self, **inputs) -> dict:
        with use_reference(self.cfg.model.dcn_reference):
            return self.engine(evaluate=True, **inputs)

    def evaluate(self) -> dict:
        """``evaluation.py``'s metrics of the raw (and EMA) weights; rank 0 logs and prints them."""
        if not self.evaluator.enabled:
            return {}
        self.engine.eval()
        result = self.evaluator.evaluate(self._eval_forward)
        if self.ema is not None and self.cfg.ema.evaluate:
            with self.ema.swapped_in():
                result.update({f"ema_{k}": v for k, v in self.evaluator.evaluate(self._eval_forward).items()})
        self.engine.train()
        self.metrics.write(self.progress.step, result, kind="eval")
        if self.is_main:
            shown = " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                             for k, v in result.items())
            print(f"eval step {self.progress.step}: {shown}", flush=True)
        return result

    def _weights_finite(self) -> bool:
        """Every rank's fp32 master weights and EMA shard hold no NaN/inf (collective)."""
        params = [(n, p) for n, p in self.engine.module.named_parameters() if p.requires_grad]
        tensors = [unpadded(p, local_master_fp32(p)) for _, p in params]
        if self.ema is not None:
            tensors += [unpadded(p, self.ema.shadow[n]) for n, p in params]
        return all_ranks(tensors_finite(tensors))

    def save(self) -> None:
        """A checkpoint of the current step; refuses (NonFiniteError) to write non-finite weights,
        so ``latest`` keeps naming the last good one. A write error on any rank (disk full) stops
        every rank with exit code 4, ``latest`` unchanged."""
        if not self._weights_finite():
            raise NonFiniteError(f"weights or EMA hold NaN/inf at step {self.progress.step}: not "
                                 "saved; the run's latest checkpoint is the last finite one.")
        run_state = RunState(Progress(**self.progress.state_dict()), self.world, self.total_steps,
                             self.ema is not None, to_dict(self.cfg), self.schedule.schedule_batch)
        rank_state = RankState(self.loader.state_dict(), self.random_state.state_dict(),
                               self.ema.state_dict() if self.ema is not None else None)
        started = time.perf_counter()
        try:
            tag = save_checkpoint(self.engine, self.root, run_state, rank_state, self.cfg.checkpoint.keep_last)
        except CheckpointWriteError as exc:  # every rank has it: all leave together, exit 4
            print(f"rank {self.rank}: {exc}", file=sys.stderr, flush=True)
            leave_distributed()
            raise SystemExit(4) from None
        self.saved_step = self.progress.step
        if self.is_main:  # what a stop signal's lead time (Slurm --signal=USR1@SECONDS) must cover
            seconds = time.perf_counter() - started
            if self.checkpoint_gib is None:  # the same every save: one walk of every rank's files, not one per save
                self.checkpoint_gib = folder_bytes(os.path.join(self.root, tag)) / 2**30
            gib = self.checkpoint_gib
            self.metrics.write(self.progress.step, {"save_seconds": seconds, "gib": gib},
                               kind="checkpoint")
            print(f"checkpoint {tag}: {gib:.2f} GiB in {seconds:.1f} s", flush=True)


