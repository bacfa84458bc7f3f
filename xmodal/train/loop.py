"""The per-worker training loop that Ray Train runs on every worker (DDP across workers)."""

from __future__ import annotations

import math
import sys
import tempfile
import time
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

from xmodal.config import Config, config_from_dict
from xmodal.train.checkpoint import load_checkpoint, save_checkpoint
from xmodal.train.metrics import MetricsLogger, progress_line
from xmodal.train.optim import build_optimizer, build_scheduler, resume_optimizer

TENSOR_KEYS = ("image", "image_meta", "profile", "profile_mask", "profile_meta", "has_image", "has_profile")


class NonFiniteLossError(RuntimeError):
    pass


def check_finite(
    loss: torch.Tensor, batch: dict[str, torch.Tensor], module: torch.nn.Module, step: int
) -> None:
    """Stop with an error that names the step and the first non-finite tensor (input or parameter)."""
    if torch.isfinite(loss).all():
        return
    bad = [k for k, v in batch.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if not bad:
        bad = [f"parameter {n}" for n, p in module.named_parameters() if not torch.isfinite(p).all()][:5]
    where = ", ".join(bad) if bad else "the loss itself (inputs and parameters are finite)"
    raise NonFiniteLossError(f"step {step}: loss is {loss.item()}; non-finite tensor(s): {where}")


def _autocast(device: torch.device, precision: str):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()


def say(line: str) -> None:
    """Print once: Ray Train patches ``print`` in workers to log *and* echo, so a plain print shows
    every line twice in the driver's output; the process's own stdout reaches it once."""
    print(line, file=sys.__stdout__, flush=True)


def epoch_seed(seed: int, rank: int, global_step: int) -> int:
    """The torch seed of the epoch that starts at ``global_step``. Every epoch re-seeds torch's RNGs,
    CPU and CUDA (DINO's random crops, dropout), from the run's seed, the rank and the step, so that a
    run resumed from a checkpoint draws what the uninterrupted run drew, with no RNG state in the
    checkpoint to gather from every rank."""
    return int(np.random.SeedSequence([seed, rank, global_step]).generate_state(1, np.uint64)[0])


def _allreduce_sum(values: list[float], device: torch.device) -> list[float]:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from xmodal.data.pipeline import local_shuffle
    from xmodal.models.build import build_model
    from xmodal.models.cpu_kernels import use_small_map_kernels
    from xmodal.train.validate import update_center, validate

    cfg: Config = config_from_dict(loop_config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.train.seed + rank)
    device = ray.train.torch.get_device()

    ckpt = ray.train.get_checkpoint()
    module = build_model(cfg, pretrained=ckpt is None)  # a checkpoint's weights replace the initial ones
    start_epoch, global_step, resume = 0, 0, None
    if ckpt is not None:
        with ckpt.as_directory() as d:
            resume = load_checkpoint(d)
        module.load_state_dict(resume["model"])
        start_epoch, global_step = resume["epoch"], resume["global_step"]
    module.to(device)
    use_small_map_kernels(module)  # same function and weights; faster kernels on CPU only
    if cfg.train.channels_last:
        # NHWC on CPU too: oneDNN then skips the layout reorders around every convolution and runs
        # batch norm ~2x faster (a training step 1.06x resnet10t at 32 px, 1.25x efficientnet_b0 at
        # 64 px, 1.0x convnext_femto; bench/RESULTS.md)
        module = module.to(memory_format=torch.channels_last)
    forward_module = torch.compile(module) if cfg.train.compile else module
    model = (
        ray.train.torch.prepare_model(forward_module, move_to_device=False) if world > 1 else forward_module
    )

    # Exact divisions (check_train_config). Every epoch takes exactly steps_per_epoch optimizer steps
    # of grad_accum micro-batches each, the steps the schedule has: Ray Train splits the data into
    # equal shards, and the micro-batches left over after the last step are not trained on, as
    # drop_last leaves the last partial micro-batch.
    per_worker_bs = cfg.optim.batch_size // world
    micro_bs = per_worker_bs // cfg.optim.grad_accum
    steps_per_epoch = max(1, loop_config["n_train"] // world // per_worker_bs)
    optimizer = build_optimizer(module.param_groups(cfg.optim.weight_decay), cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, steps_per_epoch)
    if resume is not None and "optimizer" in resume:
        changed = resume_optimizer(optimizer, scheduler, resume, cfg.optim)
        if changed and rank == 0:
            say(f"[xmodal] resuming with this config's {changed} (the checkpoint's values are replaced)")

    logger = MetricsLogger(loop_config["run_dir"]) if rank == 0 else None
    try:
        val_data, center_data = (loop_config.get(k) for k in ("val", "center"))
        if val_data is not None and not isinstance(val_data, dict):
            val_data = ray.get(val_data)
        if center_data is not None and not isinstance(center_data, dict):
            center_data = ray.get(center_data)
        shard = ray.train.get_dataset_shard("train")
        total_steps = cfg.optim.epochs * steps_per_epoch
        t_run = time.time()
        if resume is not None and start_epoch >= cfg.optim.epochs:
            # Resumed after its last epoch: a sweep's driver died between this trial's last checkpoint and
            # recording its result. Report that checkpoint's metrics once more (nothing is trained or
            # logged twice) so whoever waits on the run, a Tune trial, still gets its score.
            if rank == 0:
                say(
                    f"[xmodal] run already finished ({start_epoch} epochs); reporting its last checkpoint's metrics"
                )
            last = resume.get("metrics", {}) if rank == 0 else {}
            ray.train.report(_reportable({**last, "epoch": start_epoch, "global_step": global_step}))
        elif rank == 0 and start_epoch > 0:
            say(f"[xmodal] resuming from epoch {start_epoch} (step {global_step})")

        ga = cfg.optim.grad_accum
        for epoch in range(start_epoch, cfg.optim.epochs):
            torch.manual_seed(epoch_seed(cfg.train.seed, rank, global_step))  # same draws when resumed
            model.train()
            optimizer.zero_grad(set_to_none=True)
            t_epoch = time.time()
            wait = samples = loss_sum = step_loss = 0.0
            n_micro = epoch_steps = 0
            lr = scheduler.get_last_lr()[0]  # the lr of the epoch's last step, once it has one
            stats_sum: dict[str, float] = {}
            t_fetch = time.time()
            it = shard.iter_torch_batches(
                batch_size=micro_bs,
                drop_last=True,
                prefetch_batches=2,
                device=device,
                **local_shuffle(cfg.data, micro_bs, epoch_seed(cfg.data.seed, rank, global_step) % 2**32),
            )
            for batch in it:
                wait += time.time() - t_fetch
                if epoch_steps == steps_per_epoch:  # fewer than grad_accum micro-batches left: not a step
                    t_fetch = time.time()
                    continue
                batch = {k: batch[k] for k in TENSOR_KEYS}
                if cfg.train.channels_last:
                    batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
                last_micro = (n_micro + 1) % ga == 0
                # DDP all-reduces gradients in the backward of the step's last micro-batch only
                sync = model.no_sync if world > 1 and not last_micro else nullcontext
                with sync():
                    with _autocast(device, cfg.train.precision):
                        loss, stats = model(batch)
                    check_finite(loss, batch, module, global_step + 1)  # numbered as metrics.jsonl numbers it
                    (loss / ga).backward()
                n_micro += 1
                samples += batch["image"].shape[0]
                loss_value = loss.item()
                loss_sum += loss_value
                step_loss += loss_value / ga
                for k, v in stats.items():
                    stats_sum[k] = stats_sum.get(k, 0.0) + float(v)
                if last_micro:
                    lr = scheduler.get_last_lr()[0]  # the lr this step uses
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    scheduler.step()
                    global_step += 1
                    epoch_steps += 1
                    module.after_step(global_step / max(1, total_steps))
                    if rank == 0 and global_step % cfg.train.log_every == 0:
                        logger.log(
                            "step",
                            global_step,
                            {"loss": step_loss, "lr": lr, **{k: float(v) for k, v in stats.items()}},
                        )
                    step_loss = 0.0
                t_fetch = time.time()
            elapsed = time.time() - t_epoch
            tot_samples, tot_time, tot_wait, tot_loss, tot_micro = _allreduce_sum(
                [samples, elapsed, wait, loss_sum, float(n_micro)], device
            )
            metrics: dict[str, Any] = {
                "epoch": epoch + 1,
                "global_step": global_step,
                "train_loss": tot_loss / max(1.0, tot_micro),
                "lr": lr,
                "samples_per_s": tot_samples / max(1e-9, tot_time / world),
                "samples_per_s_worker": samples / max(1e-9, elapsed),
                "data_wait_frac": tot_wait / max(1e-9, tot_time),
                **{
                    f"train_{k}" if k != "logit_scale" and k != "logit_bias" else k: v / max(1, n_micro)
                    for k, v in stats_sum.items()
                    if k != "loss"
                },
            }
            if not math.isfinite(metrics["train_loss"]):
                raise NonFiniteLossError(f"epoch {epoch + 1}: mean training loss is not finite")
            is_ckpt_epoch = (epoch + 1) % cfg.train.checkpoint_every == 0 or epoch + 1 == cfg.optim.epochs
            # every rank takes part (each embeds a share); the center first, so that the validation
            # score sees the embeddings users get
            if center_data is not None:
                metrics.update(update_center(module, center_data, device))
            if val_data is not None:
                metrics.update(validate(module, val_data, cfg, device))
            if rank == 0:
                logger.log("epoch", epoch + 1, metrics)
                say(
                    "[xmodal] "
                    + progress_line(
                        epoch, cfg.optim.epochs, metrics, time.time() - t_run, epoch + 1 - start_epoch
                    )
                )
                if is_ckpt_epoch:
                    with tempfile.TemporaryDirectory() as tmp:
                        save_checkpoint(
                            tmp,
                            cfg,
                            module,
                            epoch + 1,
                            global_step,
                            optimizer,
                            scheduler,
                            {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                        )
                        ray.train.report(
                            _reportable(metrics), checkpoint=ray.train.Checkpoint.from_directory(tmp)
                        )
                else:
                    ray.train.report(_reportable(metrics))
            else:
                ray.train.report(_reportable(metrics))
    finally:  # also on an error: the steps before a non-finite loss are what explains it
        if logger is not None:
            logger.close()


def _reportable(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}
