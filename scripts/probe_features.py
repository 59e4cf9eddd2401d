#!/usr/bin/env python
"""Do a grounding model's image features tell its phrases apart? A linear probe per feature level.

    python scripts/probe_features.py --checkpoint runs/demo/checkpoints/last.ckpt \\
        --train data/synthetic_demo/train --val data/synthetic_demo/val --word -1

Every annotated instance of a phrase is one sample: the image features the grounding head reads (each
level of the detector neck), averaged inside the instance's mask, labelled with the phrase (for data
that names each object once, as "carrot plant" / "weed"), or with ``--word K`` with the K-th word of
phrases of two words or more (``-1``: the last, the shape of "green triangle"; ``0``: its colour;
one-word phrases are left out, so no object gets two labels). A logistic regression fitted on the
``--train`` samples is scored on the ``--val`` ones; ``--untrained`` also probes the same architecture
with random weights (seed 0), the floor a trained trunk should rise above. If the trained features
barely beat it, the head cannot find what the trunk does not show it. Prints a table and JSON
(``--json``: also a file).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from data_pipelines import ShardDataModule
from data_pipelines.atomic import write_json_atomic
from data_pipelines.batch import GroundingBatch
from sambridge.models import create_model
from sambridge.models.checkpoint_io import CheckpointError
from sambridge.models.region_alignment import mask_mean
from sambridge.models.standalone import architecture_args
from sambridge.modules.checkpoint import model_from_checkpoint


def label_of(phrase: str, word: int | None) -> str | None:
    """The probe's label of ``phrase``: the phrase, or its ``word``-th word (None for a phrase of one word
    or without that word)."""
    if word is None:
        return phrase
    words = phrase.split()
    return words[word] if len(words) > 1 and -len(words) <= word < len(words) else None


@torch.no_grad()
def pooled_features(model: torch.nn.Module, batches: Iterable[GroundingBatch],
                    word: int | None) -> tuple[list[torch.Tensor], list[str]]:
    """Per detector-neck level an (N, d) tensor of mask-averaged features, and the N labels."""
    levels: list[list[torch.Tensor]] = []
    labels: list[str] = []
    for batch in batches:
        fpn = model.encode_images(batch.images)["backbone_fpn"]
        levels = levels or [[] for _ in fpn]
        owner = batch.instance_query
        keep = [i for i, q in enumerate(owner.tolist()) if label_of(batch.phrases[q], word) is not None]
        if not keep:
            continue
        image = batch.query_image[owner[keep]]
        for store, feats in zip(levels, fpn, strict=True):
            store.append(mask_mean(feats.float(), batch.masks[keep], image))
        labels += [label_of(batch.phrases[q], word) for q in owner[keep].tolist()]
    return [torch.cat(store) for store in levels], labels


def probe_accuracy(train: torch.Tensor, train_labels: list[str], val: torch.Tensor,
                   val_labels: list[str], weight_decay: float = 1e-3) -> tuple[float, float]:
    """Train and val accuracy of an L2-regularised logistic regression (L-BFGS) on standardised features;
    a val label never seen in training counts as wrong."""
    classes = sorted(set(train_labels))
    index = {c: i for i, c in enumerate(classes)}
    y = torch.tensor([index[c] for c in train_labels])
    y_val = torch.tensor([index.get(c, -1) for c in val_labels])
    mean, std = train.mean(0), train.std(0) + 1e-6
    x, x_val = (train - mean) / std, (val - mean) / std
    torch.manual_seed(0)
    linear = torch.nn.Linear(x.shape[1], len(classes))
    optimiser = torch.optim.LBFGS(linear.parameters(), max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = F.cross_entropy(linear(x), y) + weight_decay * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimiser.step(closure)
    with torch.no_grad():
        return (float((linear(x).argmax(1) == y).float().mean()),
                float((linear(x_val).argmax(1) == y_val).float().mean()))


def _batches(shards: str, image_size: int, args: argparse.Namespace) -> list[GroundingBatch]:
    data = ShardDataModule(val=shards, batch_size=args.batch_size, num_workers=0, pin_memory=False,
                           persistent_workers=False, image_size=image_size, max_queries_per_image=args.max_queries,
                           negatives_per_image=0)
    data.setup("validate")
    return [batch for _, batch in zip(range(args.batches), data.val_dataloader(), strict=False)]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="Lightning checkpoint of a grounding run")
    parser.add_argument("--train", required=True, help="shards the probe is fitted on")
    parser.add_argument("--val", required=True, help="shards the probe is scored on")
    parser.add_argument("--word", type=int,
                        help="label by this word of phrases of two words or more (-1: the last); default: the phrase")
    parser.add_argument("--batches", type=int, default=40, help="batches read from each split")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-queries", type=int, default=16, help="phrases per image at most")
    parser.add_argument("--untrained", action="store_true", help="also probe the architecture with random weights")
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args(argv)

    try:
        model, name, model_args = model_from_checkpoint(args.checkpoint)
    except (OSError, CheckpointError) as err:
        parser.exit(2, f"probe_features: error: {err}\n")
    models = {"trained": model}
    if args.untrained:
        torch.manual_seed(0)
        models["untrained"] = create_model(name, **architecture_args(model_args)).eval()
    train_batches = _batches(args.train, model.image_size, args)
    val_batches = _batches(args.val, model.image_size, args)
    with torch.no_grad():
        fpn = model.encode_images(train_batches[0].images[:1])["backbone_fpn"]
    strides = [model.image_size // level.shape[-1] for level in fpn]
    rows = []
    for weights, net in models.items():
        train, train_labels = pooled_features(net, train_batches, args.word)
        val, val_labels = pooled_features(net, val_batches, args.word)
        for level, (x, x_val) in enumerate(zip(train, val, strict=True)):
            train_acc, val_acc = probe_accuracy(x, train_labels, x_val, val_labels)
            rows.append({"weights": weights, "stride": strides[level], "train_samples": len(train_labels),
                         "val_samples": len(val_labels), "classes": len(set(train_labels)),
                         "train_accuracy": round(train_acc, 3), "val_accuracy": round(val_acc, 3)})
    header = list(rows[0])
    print("  ".join(header))
    for row in rows:
        print("  ".join(str(row[k]) for k in header))
    result = {"checkpoint": args.checkpoint, "word": args.word, "rows": rows}
    if args.json:
        write_json_atomic(args.json, result)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
