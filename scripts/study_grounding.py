#!/usr/bin/env python
"""One row of the grounding-head study (docs/training.md): train a recipe for a few hundred steps on
the demo shards and score one-to-one, one-to-many (+ box and mask NMS) and
semantic-component outputs on val and held-out every K steps (``--ema``: also weight averages).

A plain loop over ``GroundingModule``'s own model, loss and optimiser (no Lightning, no loader
workers) so that rows differ only in what a flag changes::

    python scripts/study_grounding.py --steps 600 --every 300 --lr 1e-3 --weight-decay 0 \\
        --model-args '{"head_token_stride": 8}' --loss '{"mask_stride": 1, "score_target": "binary"}'

Prints one JSON line per evaluation (and the running mean of every loss term every 50 steps).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/synthetic_demo", help="demo shards (train/val/heldout)")
    parser.add_argument("--model", default="grounded_sam2_demo")
    parser.add_argument("--model-args", default="{}", help="JSON create_model overrides")
    parser.add_argument("--loss", default='{"mask_stride": 1}', help="JSON GroundingLossWeights fields")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=300, help="evaluate every this many steps")
    parser.add_argument("--eval-batches", type=int, default=8, help="batches of 8 images per split")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--negatives", type=int, default=2, help="absent phrases asked per training image")
    parser.add_argument("--save", help="write the trained model's state dict here at the end")
    parser.add_argument("--nms-iou", type=float, default=0.5, help="box NMS of the one-to-many outputs")
    parser.add_argument("--mask-nms", type=float, default=0.5, help="mask-containment NMS of the one-to-many outputs")
    parser.add_argument("--ema", type=float, nargs="*", default=[],
                        help="also score exponential moving averages of the weights with these decays (one-to-many)")
    args = parser.parse_args()

    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from data_pipelines import ShardDataModule
    from sambridge.metrics import ConceptSegmentationMetrics
    from sambridge.modules import GroundingModule
    from sambridge.modules.grounding import GroundingLossWeights
    from sambridge.optim import OptimizerConfig, build_optimizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = ShardDataModule(train=f"{args.data}/train", val=f"{args.data}/val", test=f"{args.data}/heldout",
                           batch_size=8, num_workers=0, pin_memory=False, persistent_workers=False,
                           image_size=args.image_size, max_queries_per_image=6, negatives_per_image=args.negatives)
    data.setup("fit")
    data.setup("test")
    optimizer_config = OptimizerConfig(lr=args.lr, lr_multipliers={"backbone": 1.0, "text": 1.0},
                                       weight_decay=args.weight_decay, warmup_steps=args.warmup)
    module = GroundingModule(model=args.model, model_args=json.loads(args.model_args), image_size=args.image_size,
                             loss=GroundingLossWeights(**json.loads(args.loss)), optimizer=optimizer_config)
    model = module.model
    optimizer, schedule = build_optimizer(module.trainable_parameter_groups(), optimizer_config, args.steps)
    size = (args.image_size, args.image_size)
    averages = {decay: AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
                for decay in args.ema}

    def read_one_to_many(out, batch) -> dict[str, torch.Tensor]:
        return model.postprocess(out, top_k=20, score_threshold=0.1, out_hw=size, nms_iou=args.nms_iou,
                                 mask_nms=args.mask_nms)

    @torch.no_grad()
    def evaluate_averages(loader) -> dict[str, dict[str, float]]:
        """The one-to-many read-out of each weight average (swapped into the model, then swapped back)."""
        trained, scores = {k: v.clone() for k, v in model.state_dict().items()}, {}
        model.eval()
        model.one_to_many_outputs = True
        for decay, average in averages.items():
            model.load_state_dict(average.module.state_dict())
            metrics = ConceptSegmentationMetrics()
            for batch in itertools.islice(loader, args.eval_batches):
                out = model(batch.images, batch.phrases, batch.query_image)
                metrics.update_from_batch(read_one_to_many(out, batch), batch)
            scores[f"ema_{decay}"] = {k: round(float(v), 3) for k, v in metrics.compute().items()
                                      if k in ("cgF1", "AP", "IL_MCC", "count_mae")}
        model.load_state_dict(trained)
        model.one_to_many_outputs = False
        model.train()
        return scores

    @torch.no_grad()
    def evaluate(loader) -> dict[str, dict[str, float]]:
        scores = {name: ConceptSegmentationMetrics() for name in ("one_to_one", "one_to_many", "components")}
        model.eval()
        for i, batch in enumerate(loader):
            if i >= args.eval_batches:
                break
            for one_to_many in (False, True):
                model.one_to_many_outputs = one_to_many
                out = model(batch.images, batch.phrases, batch.query_image)
                post = (read_one_to_many(out, batch) if one_to_many else
                        model.postprocess(out, top_k=20, score_threshold=0.1, out_hw=size))
                scores["one_to_many" if one_to_many else "one_to_one"].update_from_batch(post, batch)
                if not one_to_many:
                    scores["components"].update_from_batch(
                        model.postprocess(out, top_k=20, score_threshold=0.1, out_hw=size, instances="components"),
                        batch)
        model.one_to_many_outputs = False
        model.train()
        keys = ("cgF1", "cgF1@0.5", "AP", "AP50", "AP75", "IL_MCC", "pmF1", "mIoU", "count_mae", "duplicate_rate")
        return {**{name: {k: round(float(v), 3) for k, v in m.compute().items() if k in keys}
                   for name, m in scores.items()}, **evaluate_averages(loader)}

    start, step, running, epoch = time.time(), 0, {}, 0
    batches = iter(data.train_dataloader())
    model.train()
    while step < args.steps:
        try:
            batch = next(batches)
        except StopIteration:  # a new epoch: new shard order and augmentation draws, as under Lightning
            epoch += 1
            data.set_epoch(epoch)
            batches = iter(data.train_dataloader())
            batch = next(batches)
        with torch.jit.optimized_execution(False):
            losses = module.loss_fn(model(batch.images, batch.phrases, batch.query_image, targets=batch), batch)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        for average in averages.values():
            average.update_parameters(model)
        step += 1
        for name, value in losses.items():
            if "_aux_" not in name and "o2m" not in name:
                running.setdefault(name, []).append(float(value.detach()))
        if step % 50 == 0:
            means = {k: round(sum(v) / len(v), 3) for k, v in running.items()}
            print(f"step {step} ({time.time() - start:.0f} s) {means}", flush=True)
            running = {}
        if step % args.every == 0:
            row = {"step": step, "seconds": round(time.time() - start),
                   "val": evaluate(data.val_dataloader()), "heldout": evaluate(data.test_dataloader())}
            print(json.dumps(row), flush=True)
    if args.save:
        torch.save(model.state_dict(), args.save)


if __name__ == "__main__":
    main()
