#!/usr/bin/env python
"""Training speed of GroundingModule under Lightning against a plain PyTorch loop, host
synchronisations and operators per training step, and peak memory of full against LoRA
fine-tuning. Prints a table and JSON.

    python scripts/bench_train.py                                   # tiny model, CPU
    python scripts/bench_train.py --smoke                           # seconds: every number, tiny
    python scripts/bench_train.py --model grounded_sam2_hiera_t --image-size 1024 --batch-size 2 \\
        --device cuda --precision bf16-mixed --json bench_train.json

Both loops run the same forward, loss, backward and optimiser step (AdamW over the same
parameter groups, gradient clipping) on the same pre-collated batches of synthetic shards, so the
ratio measures Lightning's overhead. Memory is measured in a fresh process per fine-tuning mode:
peak CUDA memory on a GPU, peak resident memory growth on the CPU.

Host synchronisations and top-level operators are counted (``sambridge.profiling.HostSyncCounter``,
which says what counts) over a few Lightning training steps set up as a shipped GPU config runs them
(fused AdamW, gradient clipping, progress bar, a logger), so they can be counted on a CPU.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


FUSED = {"auto": None, "true": True, "false": False}  # --fused -> OptimizerConfig.fused


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="grounded_sam2_tiny")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per loop")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each loop; best is kept")
    parser.add_argument("--profile-steps", type=int, default=4, help="training steps profiled for host syncs")
    parser.add_argument("--fused", choices=["auto", "true", "false"], default="true",
                        help="AdamW of every measurement: fused (what a run builds on a GPU or CPU), torch's "
                             "unfused for-loop/foreach one (false) or sambridge's choice for the device (auto)")
    parser.add_argument("--gradient-clip-val", type=float, default=0.1)
    parser.add_argument("--skip-speed", action="store_true", help="only count host syncs and ops")
    parser.add_argument("--smoke", action="store_true",
                        help="a seconds-long run of every measurement at 64 px (checks the script, not the speed)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--memory-only", choices=["full", "lora"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.image_size, args.batch_size, args.steps, args.warmup, args.repeats = 64, 2, 2, 1, 1
        args.profile_steps = min(args.profile_steps, 2)
    return args


def make_batches(args: argparse.Namespace, data_dir: Path) -> list:
    """Pre-collated batches of synthetic shards (the same list feeds both loops)."""
    from data_pipelines.datamodule import ShardDataModule
    from data_pipelines.synthetic import generate_synthetic

    if not (data_dir / "train" / "manifest.json").exists():
        generate_synthetic(data_dir, image_size=min(args.image_size, 256), num_train=args.batch_size * 16,
                           num_val=0, num_heldout=0, max_count=args.batch_size * 4, overwrite=True)
    dm = ShardDataModule(train=str(data_dir / "train"), image_size=args.image_size, batch_size=args.batch_size,
                         num_workers=0, persistent_workers=False, max_queries_per_image=8)
    dm.setup("fit")
    return list(itertools.islice(iter(dm.train_dataloader()), 16))


def build_module(args: argparse.Namespace, finetune: str = "full"):
    from sambridge.modules import GroundingModule
    from sambridge.optim import OptimizerConfig

    torch.manual_seed(0)
    return GroundingModule(model=args.model, finetune=finetune, image_size=args.image_size,
                           optimizer=OptimizerConfig(lr=1e-4, warmup_steps=0, total_steps=10_000,
                                                     fused=FUSED[args.fused]))


def make_optimizer(module) -> torch.optim.Optimizer:
    """The optimiser ``configure_optimizers`` builds (same parameter groups), without a trainer."""
    from sambridge.optim import build_optimizer

    return build_optimizer(module.trainable_parameter_groups(), module.optimizer_config, 10_000)[0]


def autocast(args: argparse.Namespace):
    enabled = args.precision == "bf16-mixed"
    return torch.autocast(device_type=torch.device(args.device).type, dtype=torch.bfloat16, enabled=enabled)


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def plain_loop(args: argparse.Namespace, batches: list) -> float:
    """Steps/s of a hand-written loop doing what the Lightning module does in training_step."""
    module = build_module(args).to(args.device).train()
    optimizer = make_optimizer(module)
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            sync(args.device)
            start = time.perf_counter()
        batch = batches[step % len(batches)]
        batch = module.transfer_batch_to_device(batch, torch.device(args.device), 0)
        with autocast(args):
            loss = module.training_step(batch, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
    sync(args.device)
    return args.steps / (time.perf_counter() - start)


class _StepTimer:
    """Times the training steps after ``warmup`` (a Lightning callback, built lazily)."""

    def __new__(cls, warmup: int, device: str):
        from lightning.pytorch.callbacks import Callback

        class StepTimer(Callback):
            def __init__(self) -> None:
                self.start = self.end = 0.0
                self.steps = 0

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
                if trainer.global_step == warmup:
                    sync(device)
                    self.start = time.perf_counter()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
                if trainer.global_step > warmup:
                    sync(device)
                    self.end = time.perf_counter()
                    self.steps = trainer.global_step - warmup

        return StepTimer()


def lightning_loop(args: argparse.Namespace, batches: list) -> float:
    import lightning.pytorch as pl

    module = build_module(args)
    timer = _StepTimer(args.warmup, args.device)
    trainer = pl.Trainer(accelerator="gpu" if "cuda" in args.device else "cpu", devices=1,
                         precision=args.precision, max_steps=args.warmup + args.steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         gradient_clip_val=1.0, num_sanity_val_steps=0, callbacks=[timer])
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
    trainer.fit(module, train_dataloaders=loader)
    return timer.steps / (timer.end - timer.start)


class _SyncProfiler:
    """Profiles training steps ``[start, start + steps)`` of a fit (a Lightning callback, built lazily):
    from one step's start to the start of the step after the last, so each step's hooks, logging,
    progress bar and next-batch fetch are in."""

    def __new__(cls, start: int, steps: int):
        from lightning.pytorch.callbacks import Callback

        from sambridge.profiling import HostSyncCounter

        class SyncProfiler(Callback):
            def __init__(self) -> None:
                self.counter = None
                self.syncs: dict[str, int] = {}
                self.top_level_ops = 0

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
                if trainer.global_step == start:
                    self.counter = HostSyncCounter()
                    self.counter.__enter__()
                elif trainer.global_step == start + steps:
                    self._stop()

            def on_train_end(self, trainer, pl_module) -> None:
                self._stop()

            def _stop(self) -> None:
                if self.counter is None:
                    return
                self.counter.__exit__(None, None, None)
                self.syncs, self.top_level_ops = self.counter.syncs, self.counter.top_level_ops
                self.counter = None

        return SyncProfiler()


def host_syncs(args: argparse.Namespace, batches: list, log_dir: Path) -> dict:
    """Host syncs and top-level operators per training step of a Lightning fit set up as a shipped GPU
    config (fused AdamW unless ``--fused``, gradient clipping, progress bar, CSV logger)."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    module = build_module(args)
    module.loss_on_progress_bar = False  # as on a GPU: the bar would read the loss after every step
    start = 2  # after the first steps' one-off work
    profiler = _SyncProfiler(start, args.profile_steps)
    trainer = pl.Trainer(accelerator="gpu" if "cuda" in args.device else "cpu", devices=1,
                         precision=args.precision, max_steps=start + args.profile_steps + 1,
                         logger=CSVLogger(log_dir), log_every_n_steps=50, enable_checkpointing=False,
                         enable_model_summary=False, gradient_clip_val=args.gradient_clip_val,
                         num_sanity_val_steps=0, callbacks=[profiler])
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
    trainer.fit(module, train_dataloaders=loader)
    steps = args.profile_steps
    by_kind = {kind: count / steps for kind, count in sorted(profiler.syncs.items())}
    return {"host_syncs_per_step": sum(by_kind.values()), "host_syncs_by_kind": by_kind,
            "top_level_ops_per_step": profiler.top_level_ops / steps, "profiled_steps": steps,
            "optimizer_fused": FUSED[args.fused]}


def optimizer_step_ms(args: argparse.Namespace) -> float:
    """Milliseconds of one optimiser step over every trainable parameter (random gradients)."""
    module = build_module(args).to(args.device)
    optimizer = make_optimizer(module)
    for p in module.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p) * 1e-3
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            sync(args.device)
            start = time.perf_counter()
        optimizer.step()
    sync(args.device)
    return 1000 * (time.perf_counter() - start) / args.steps


def peak_memory(args: argparse.Namespace, finetune: str, batches: list) -> float:
    """Peak memory (MB) of a few training steps above what model and data hold before them: CUDA
    max allocated, or on the CPU the growth of the peak resident set (Linux /proc)."""
    module = build_module(args, finetune).to(args.device).train()
    optimizer = make_optimizer(module)
    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set (VmHWM) to now
        base = _proc_status_bytes("VmRSS")
    for step in range(3):
        batch = module.transfer_batch_to_device(batches[step % len(batches)], torch.device(args.device), 0)
        with autocast(args):
            loss = module.training_step(batch, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    peak = torch.cuda.max_memory_allocated() if cuda else _proc_status_bytes("VmHWM")
    return (peak - base) / 2**20


def _proc_status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (Linux), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_in_subprocess(args: argparse.Namespace, finetune: str, data_dir: Path) -> float:
    cmd = [sys.executable, __file__, "--memory-only", finetune, "--data", str(data_dir), "--model", args.model,
           "--image-size", str(args.image_size), "--batch-size", str(args.batch_size), "--device", args.device,
           "--precision", args.precision, "--fused", args.fused]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(args.data or tmp)
        batches = make_batches(args, data_dir)
        if args.memory_only:
            print(peak_memory(args, args.memory_only, batches))
            return 0
        syncs = host_syncs(args, batches, Path(tmp) / "logs")
        optimizer_ms = optimizer_step_ms(args)
        plain, lightning, memory = [], [], {}
        if not args.skip_speed:
            for _ in range(args.repeats):  # alternate to spread machine noise over both
                plain.append(plain_loop(args, batches))
                lightning.append(lightning_loop(args, batches))
            memory = {mode: memory_in_subprocess(args, mode, data_dir) for mode in ("full", "lora")}
    device = torch.cuda.get_device_name() if "cuda" in args.device else f"CPU ({torch.get_num_threads()} threads)"
    result = {
        "model": args.model, "image_size": args.image_size, "batch_size": args.batch_size,
        "precision": args.precision, "device": device, "steps": args.steps, "smoke": args.smoke,
        **syncs, "optimizer_step_ms": optimizer_ms,
        "plain_steps_per_s": max(plain, default=None), "lightning_steps_per_s": max(lightning, default=None),
        "lightning_over_plain": max(lightning) / max(plain) if plain else None,
        "images_per_s": max(lightning) * args.batch_size if lightning else None,
        "peak_memory_mb": memory, "lora_over_full_memory": memory["lora"] / memory["full"] if memory else None,
    }
    kinds = ", ".join(f"{kind} {n:g}" for kind, n in syncs["host_syncs_by_kind"].items()) or "none"
    optimizer = {None: "device default", True: "fused", False: "for-loop/foreach"}[syncs["optimizer_fused"]]
    rows = [("device", device), ("model", f"{args.model} @ {args.image_size}px, batch {args.batch_size}"),
            ("host syncs per training step", f"{syncs['host_syncs_per_step']:g} ({kinds}; AdamW {optimizer})"),
            ("top-level ops per training step", f"{syncs['top_level_ops_per_step']:.0f}"),
            ("AdamW step", f"{optimizer_ms:.1f} ms ({optimizer})")]
    if plain:
        rows += [("plain PyTorch loop", f"{result['plain_steps_per_s']:.2f} steps/s"),
                 ("Lightning GroundingModule", f"{result['lightning_steps_per_s']:.2f} steps/s"),
                 ("Lightning / plain", f"{result['lightning_over_plain']:.3f} (target >= 0.95)"),
                 ("peak memory, full fine-tuning", f"{memory['full']:.0f} MB"),
                 ("peak memory, LoRA", f"{memory['lora']:.0f} MB"),
                 ("LoRA / full memory", f"{result['lora_over_full_memory']:.2f}")]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    print(json.dumps(result))
    if args.json:
        from data_pipelines.atomic import write_json_atomic

        write_json_atomic(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
