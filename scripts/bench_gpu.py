#!/usr/bin/env python
"""The GPU check: the shipped LoRA and full configs trained through ``train.py fit`` on synthetic
1,024 px shards for a few dozen steps, against the forward pass of the same model. Prints one
table and JSON.

    python scripts/bench_gpu.py --json bench_gpu.json        # one GPU, at most ~8 minutes
    python scripts/bench_gpu.py --smoke                      # CPU, tiny models at 64 px, < 3 minutes

Per config: training images/s, step time and data wait (the ``Throughput`` callback, after the first
window), forward-only images/s of the same model at the same batch (bf16, no gradients) and the
ratio of the two, peak memory (``Throughput``: CUDA memory allocated; on a CPU the peak resident set),
the start-up breakdown and the time from the command to the end of the first step (the ``Timeline``
callback), and the time from the end of fit to the process exit (``exited`` is false when the
process had to be killed ``--exit-timeout`` seconds after fit). Plus the host syncs and operators per
training step of Hiera-T (full fine-tuning, ``scripts/bench_train.py``) and LoRA / full peak memory.

Official weights are not needed: the runs start from random weights (``sam2_checkpoint: null``, no
text-tower file), which costs the same time and memory. The configs run as shipped otherwise
(bf16-mixed, gradient clipping, their batch size and workers, checkpoint callbacks, the evaluation
report at sanity validation), with a CSV logger instead of wandb and ``max_steps`` cut short.
``--smoke`` swaps in ``grounded_sam2_tiny`` at 64 px, batch 2, one worker: the same code path and
JSON keys, to keep the script working between GPU loans; its speeds mean nothing.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import selectors
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    "hiera_t_lora": "configs/grounding/sam2.1_hiera_t_lora.yaml",
    "hiera_t_full": "configs/grounding/sam2.1_hiera_t_full.yaml",
    "hiera_b+_lora": "configs/grounding/sam2.1_hiera_b+_lora.yaml",
    "hiera_b+_full": "configs/grounding/sam2.1_hiera_b+_full.yaml",
}
SHARED = ["--config", "configs/trainer/default.yaml", "--config", "configs/data/shards.yaml"]
"""What every run config above is stacked on, as the configs' headers document."""
TIMELINE = "sambridge timeline "


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, 64 px: checks the script")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=30, help="training steps per config")
    parser.add_argument("--window", type=int, default=5, help="steps per Throughput measurement")
    parser.add_argument("--forward-steps", type=int, default=10, help="timed forward passes per model")
    parser.add_argument("--timeout", type=float, default=240, help="seconds a training run may take")
    parser.add_argument("--exit-timeout", type=float, default=60, help="seconds from fit end to exit before a kill")
    parser.add_argument("--workdir", help="keep shards and runs here (default: a temporary directory)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--forward-only", help=argparse.SUPPRESS)  # internal: CONFIG, prints forward images/s
    parser.add_argument("--shards", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.window, args.forward_steps = min(args.steps, 8), 2, min(args.forward_steps, 3)
        args.timeout, args.exit_timeout = min(args.timeout, 90), min(args.exit_timeout, 30)
    return args


def settings(smoke: bool) -> dict:
    """What differs between the GPU run and the CPU smoke run."""
    if smoke:
        return {"image_size": 64, "num_train": 48, "num_val": 4, "max_count": 12, "precision": "bf16-mixed",
                "accelerator": "cpu", "model": "grounded_sam2_tiny", "batch_size": 2, "workers": 1}
    return {"image_size": 1024, "num_train": 256, "num_val": 8, "max_count": 16, "precision": "bf16-mixed",
            "accelerator": "gpu", "model": None, "batch_size": None, "workers": None}


def model_overrides(smoke: bool) -> list[str]:
    """Random weights: no SAM2 checkpoint, no text-tower file (and the tiny model for the smoke run)."""
    args = ["--model.init_args.sam2_checkpoint", "null", "--model.init_args.model_args", "{}"]
    if smoke:
        args += ["--model.init_args.model", settings(True)["model"]]
    return args


def data_overrides(shards: Path, smoke: bool) -> list[str]:
    s = settings(smoke)
    args = ["--data.init_args.train", str(shards / "train"), "--data.init_args.val", str(shards / "val")]
    if smoke:
        args += ["--data.init_args.image_size", str(s["image_size"]), "--data.init_args.batch_size",
                 str(s["batch_size"]), "--data.init_args.num_workers", str(s["workers"])]
    return args


def make_shards(out: Path, smoke: bool) -> float:
    """Synthetic shards with the data pipeline's own generator; returns the seconds it took."""
    s = settings(smoke)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "data_pipelines", "synthetic", "--out", str(out), "--image-size",
                    str(s["image_size"]), "--num-train", str(s["num_train"]), "--num-val", str(s["num_val"]),
                    "--num-heldout", "0", "--max-count", str(s["max_count"]), "--format", "jpg", "--overwrite",
                    "--no-progress"], cwd=REPO, check=True, capture_output=True, text=True)
    return time.perf_counter() - start


def read_metrics(run: Path) -> dict[str, float]:
    """Mean Throughput metrics after the first window, and the last peak memory, from the CSV logs."""
    files = sorted(run.rglob("metrics.csv"))
    if not files:
        return {}
    with files[-1].open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("train_images_per_s")]
    timed = rows[1:] or rows
    out = {}
    for key in ("train_images_per_s", "train_step_s", "train_data_wait"):
        values = [float(r[key]) for r in timed if r.get(key)]
        out[key] = sum(values) / len(values) if values else None
    peaks = [float(r["train_peak_memory_mb"]) for r in rows if r.get("train_peak_memory_mb")]
    out["peak_memory_mb"] = max(peaks) if peaks else None
    return out


def train(name: str, shards: Path, workdir: Path, args: argparse.Namespace) -> dict:
    """``train.py fit`` of one shipped config; start-up, throughput, memory and exit."""
    s = settings(args.smoke)
    run = workdir / "runs" / name
    cmd = [sys.executable, "train.py", "fit", *SHARED, "--config", CONFIGS[name], *model_overrides(args.smoke),
           *data_overrides(shards, args.smoke), "--trainer.max_steps", str(args.steps),
           "--trainer.log_every_n_steps", str(args.window), "--trainer.default_root_dir", str(run),
           "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.init_args.save_dir",
           str(run), "--trainer.enable_progress_bar", "false", "--trainer.precision", s["precision"],
           "--trainer.accelerator", s["accelerator"], "--trainer.devices", "1",
           "--trainer.callbacks+=sambridge.callbacks.throughput.Throughput",
           "--trainer.callbacks+=sambridge.callbacks.timeline.Timeline"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.smoke:
        env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "1")
    run.mkdir(parents=True, exist_ok=True)
    log = (run / "output.log").open("w")
    launched = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    timeline: dict = {}
    killed = False
    deadline = launched + args.timeout
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    while True:
        limit = (timeline["fit_end_unix"] + args.exit_timeout) if timeline else deadline
        if time.time() > limit:
            proc.kill()
            killed = True
            break
        if not selector.select(timeout=0.5):
            if proc.poll() is not None:
                break
            continue
        line = proc.stdout.readline()
        if not line:
            break
        log.write(line)
        if TIMELINE in line:
            timeline = json.loads(line.split(TIMELINE, 1)[1])
    proc.wait()
    ended = time.time()
    log.close()
    metrics = read_metrics(run)
    first_step = timeline.get("first_step_done")
    result = {
        "config": CONFIGS[name], "returncode": proc.returncode,
        "train_images_per_s": metrics.get("train_images_per_s"), "step_s": metrics.get("train_step_s"),
        "data_wait": metrics.get("train_data_wait"), "peak_memory_mb": metrics.get("peak_memory_mb"),
        "command_to_first_step_s": first_step,
        "startup_s": {k: timeline[k] for k in ("imports_done", "built", "fit_start", "sanity_done", "first_batch",
                                                "first_step_done") if k in timeline},
        "fit_end_to_exit_s": (ended - timeline["fit_end_unix"]) if timeline else None,
        "exited": bool(timeline) and not killed and proc.returncode == 0,
        "log": str(run / "output.log"),
    }
    if proc.returncode != 0 and not killed:
        tail = (run / "output.log").read_text().splitlines()[-15:]
        result["error"] = "\n".join(tail)
    return result


def forward_only(config: str, shards: Path, smoke: bool, steps: int) -> dict:
    """Forward images/s of the config's model (bf16 autocast, no gradients) at its training batch."""
    import torch

    sys.path.insert(0, str(REPO))
    from sambridge.cli import lightning_cli

    s = settings(smoke)
    cli = lightning_cli([*SHARED, "--config", config, *model_overrides(smoke), *data_overrides(shards, smoke),
                         "--data.init_args.num_workers", "0", "--trainer.logger", "false",
                         "--trainer.accelerator", s["accelerator"], "--trainer.devices", "1"], run=False)
    device = torch.device("cuda" if s["accelerator"] == "gpu" else "cpu")
    module = cli.model.to(device).eval()
    cli.datamodule.setup("fit")
    loader = iter(cli.datamodule.train_dataloader())
    batches = [module.transfer_batch_to_device(next(loader), device, 0) for _ in range(2)]
    times = []
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        for i in range(steps + 2):
            batch = batches[i % len(batches)]
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            module.model(batch.images, batch.phrases, batch.query_image)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 2:
                times.append((time.perf_counter() - start, batch.num_images))
    return {"forward_images_per_s": sum(n for _, n in times) / sum(t for t, _ in times)}


def forward_in_subprocess(name: str, shards: Path, args: argparse.Namespace) -> float | None:
    cmd = [sys.executable, __file__, "--forward-only", CONFIGS[name], "--shards", str(shards),
           "--forward-steps", str(args.forward_steps), *(["--smoke"] if args.smoke else [])]
    env = {**os.environ, **({"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")} if args.smoke else {})}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        print(done.stdout[-2000:], done.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])["forward_images_per_s"]


def host_syncs(shards: Path, args: argparse.Namespace) -> dict:
    """Host syncs and top-level operators per training step (``bench_train.py``) of Hiera-T, full fine-tuning."""
    s = settings(args.smoke)
    model = s["model"] or "grounded_sam2_hiera_t"
    cmd = [sys.executable, str(REPO / "scripts/bench_train.py"), "--skip-speed", "--model", model,
           "--image-size", str(s["image_size"]), "--batch-size", str(s["batch_size"] or 4), "--profile-steps", "3",
           "--device", "cpu" if args.smoke else "cuda", "--precision", s["precision"], "--data", str(shards)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        print(done.stderr[-2000:], file=sys.stderr)
        return {}
    return json.loads(done.stdout.strip().splitlines()[-1])


def device_name(smoke: bool) -> str:
    import torch

    if not smoke and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"CPU, {os.cpu_count()} cores (torch {torch.__version__})"


def fmt(value, spec: str = ".1f", unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.forward_only:
        print(json.dumps(forward_only(args.forward_only, Path(args.shards), args.smoke, args.forward_steps)))
        return 0
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        shards = workdir / "shards"
        shards_s = make_shards(shards, args.smoke)
        runs = {name: train(name, shards, workdir, args) for name in args.configs}
        forward: dict[str, float | None] = {}
        for name in args.configs:  # one forward measurement per model: LoRA adapters add little
            model = name.rsplit("_", 1)[0]
            if model not in forward:
                forward[model] = forward_in_subprocess(name, shards, args)
            fwd = forward[model]
            train_ips = runs[name]["train_images_per_s"]
            runs[name]["forward_images_per_s"] = fwd
            runs[name]["train_over_forward"] = train_ips / fwd if train_ips and fwd else None
        syncs = host_syncs(shards, args)
    memory_ratio = {}
    for model in forward:
        lora, full = runs.get(f"{model}_lora", {}), runs.get(f"{model}_full", {})
        if lora.get("peak_memory_mb") and full.get("peak_memory_mb"):
            memory_ratio[model] = lora["peak_memory_mb"] / full["peak_memory_mb"]
    result = {
        "device": device_name(args.smoke), "smoke": args.smoke, "image_size": settings(args.smoke)["image_size"],
        "steps": args.steps, "shards_s": shards_s, "runs": runs, "lora_over_full_memory": memory_ratio,
        "host_syncs_per_step": syncs.get("host_syncs_per_step"),
        "host_syncs_by_kind": syncs.get("host_syncs_by_kind"),
        "top_level_ops_per_step": syncs.get("top_level_ops_per_step"),
        "total_s": time.perf_counter() - started,
    }
    header = ("config", "train img/s", "fwd img/s", "train/fwd", "step s", "data wait", "peak MB",
              "first step s", "exit s", "exited")
    rows = [header]
    for name, r in runs.items():
        rows.append((name, fmt(r["train_images_per_s"], ".2f"), fmt(r["forward_images_per_s"], ".2f"),
                     fmt(r["train_over_forward"], ".3f"), fmt(r["step_s"], ".3f"), fmt(r["data_wait"], ".3f"),
                     fmt(r["peak_memory_mb"], ".0f"), fmt(r["command_to_first_step_s"]),
                     fmt(r["fit_end_to_exit_s"]), str(r["exited"]).lower()))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    print(f"{result['device']}, {result['image_size']} px{' (smoke: speeds mean nothing)' if args.smoke else ''}")
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    for model, ratio in memory_ratio.items():
        print(f"LoRA / full peak memory, {model}: {ratio:.2f}")
    print(f"host syncs per training step: {fmt(result['host_syncs_per_step'], 'g')} "
          f"({result['host_syncs_by_kind']}); top-level ops per step: {fmt(result['top_level_ops_per_step'], '.0f')}")
    print(f"total {result['total_s']:.0f} s (shards {shards_s:.0f} s)")
    for name, r in runs.items():
        if r.get("error"):
            print(f"{name} failed (exit {r['returncode']}):\n{r['error']}", file=sys.stderr)
    print(json.dumps(result))
    if args.json:
        from data_pipelines.atomic import write_json_atomic

        write_json_atomic(args.json, result)
    return 0 if all(r["exited"] for r in runs.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
