"""Train-step speed of the seed recipe in PyTorch, the baseline for flaxresnet's GPU figures (train_step.py).

The model: torchvision's ResNet50 (random weights; no conv biases, its own BatchNorm defaults) with every conv
frozen and every BatchNorm trainable and in train mode (batch statistics), then the seed head: global average
pooling -> Linear(2048, 256) + ReLU -> Dropout(0.25) -> BatchNorm1d -> Linear(256, classes); softmax
cross-entropy, Adam (learning rate 1e-3, epsilon 1e-7 as Keras') over the BatchNorm and head parameters,
channels_last. Its input is what flaxresnet's step gets: uint8 NHWC batches on the device, then on the device
caffe preprocessing (RGB -> BGR, minus the ImageNet BGR means), random erasing (the seed's sampling as
flaxresnet.augment.random_erasing, vectorised: at most 32 draws of the rectangle per image, none fitting leaves
it unerased) and nearest upsampling by a whole factor (32 px -> 256 px: x8).

A variant is IMPL:EXEC:DTYPE. IMPL is `torch` (a train step: forward, loss, backward, Adam) or `torch-eval`
(inference: no erasing, BatchNorm on running statistics, top-1 hits). EXEC is `eager` or `compile`
(torch.compile, default mode, of input processing + model + loss; the optimizer step stays eager: fused Adam
on CUDA). DTYPE is `float32` (PyTorch's defaults: TF32 cuDNN convolutions, full float32 matmuls) or `bfloat16`
(torch.autocast). cuDNN autotuning is on (`cudnn.benchmark`).

The data (train_step.py's synthetic uint8 images and labels, in data.train_batches order, on the device before
timing), the timing (first step, warm-up steps, then the variants in turn, each step timed up to a device
synchronisation) and the JSON are train_step.py's (benchmarks/common.py). Runs on the first CUDA GPU, else on
the CPU. PyTorch is imported only to run, so `--help` works without it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
from collections.abc import Callable
from typing import Any

# JAX comes with these imports but is never used here (no backend starts, so it takes none of the GPU's memory).
from benchmarks.common import (add_step_args, median_ratio, parse_step_args, parse_variant, report, step_rows,
                               synthetic_split, time_steps)
from flaxresnet import data
from flaxresnet.preprocess import CAFFE_MEAN_BGR

IMPLS = ("torch", "torch-eval")
DEFAULT_VARIANTS = ("torch:eager:bfloat16", "torch:compile:bfloat16", "torch-eval:eager:bfloat16")
# Distinct batches cycled through during timing (as train_step.py).
POOL = 2
# Draws of the erasing rectangle per image (flaxresnet redraws until one fits).
ERASING_TRIES = 32


@dataclasses.dataclass(frozen=True)
class Variant:
    """One thing to time: train step or inference, eager or compiled, compute dtype."""

    impl: str
    exec: str
    dtype: str

    @classmethod
    def parse(cls, spec: str) -> Variant:
        return cls(*parse_variant(spec, IMPLS, "exec", ("eager", "compile")))

    def __str__(self) -> str:
        return f"{self.impl}:{self.exec}:{self.dtype}"


def random_erasing(x: Any, p: float = 0.5, area: tuple[float, float] = (0.02, 0.4),
                   aspect: tuple[float, float] = (0.3, 1 / 0.3), tries: int = ERASING_TRIES) -> Any:
    """flaxresnet.augment.random_erasing on a batch (N, H, W, C) in torch: per image with probability p, the
    first of `tries` rectangles (area fraction ~ U(area), aspect ~ U(aspect), top-left corner uniform) that
    fits, filled with U(0, 1) noise per pixel and channel."""
    import torch

    n, height, width, _ = x.shape
    s = torch.empty(n, tries, device=x.device).uniform_(*area) * (height * width)
    r = torch.empty(n, tries, device=x.device).uniform_(*aspect)
    w, h = torch.sqrt(s / r).int(), torch.sqrt(s * r).int()
    left = torch.randint(0, width, (n, tries), device=x.device)
    top = torch.randint(0, height, (n, tries), device=x.device)
    fits = (left + w <= width) & (top + h <= height)
    pick = fits.float().argmax(1, keepdim=True)  # the first fitting draw

    def chosen(t: Any) -> Any:
        return t.gather(1, pick)[:, :, None]  # (N, 1, 1)

    top, left, h, w = map(chosen, (top, left, h, w))
    rows = torch.arange(height, device=x.device)[None, :, None]
    cols = torch.arange(width, device=x.device)[None, None, :]
    erase = (torch.rand(n, device=x.device) <= p) & fits.any(1)
    inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w) & erase[:, None, None]
    return torch.where(inside[..., None], torch.rand_like(x), x)


def seed_step(variant: Variant, args: argparse.Namespace, split: data.Split, device: Any) -> Callable[[], Any]:
    """A closure running one train (or eval) step of a fresh seed-recipe model on the next batch of `split`
    (already on `device`); returns the loss (train) or the top-1 hits (eval), still on the device."""
    import torch
    import torchvision
    from torch import nn

    factor = args.image_size // args.native_size
    autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16,
                                 enabled=variant.dtype == "bfloat16")
    training = variant.impl == "torch"

    class Seed(nn.Module):
        """uint8 NHWC batch -> preprocessed (and erased, when training) -> upsampled -> ResNet50 -> seed head."""

        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.tensor(CAFFE_MEAN_BGR))
            self.backbone = torchvision.models.resnet50(weights=None)
            self.backbone.fc = nn.Identity()  # keeps the global average pooling: (N, 2048)
            self.head = nn.Sequential(nn.Linear(2048, 256), nn.ReLU(), nn.Dropout(0.25), nn.BatchNorm1d(256),
                                      nn.Linear(256, args.classes))

        def forward(self, images: Any) -> Any:
            x = images.flip(-1).float() - self.mean
            if self.training:
                x = random_erasing(x)
            x = x.permute(0, 3, 1, 2)  # NCHW with NHWC strides: channels_last
            x = nn.functional.interpolate(x, scale_factor=factor, mode="nearest")
            with autocast():
                return self.head(self.backbone(x.contiguous(memory_format=torch.channels_last))).float()

    class Loss(nn.Module):
        """Mean softmax cross-entropy of the model's logits: what the train step differentiates."""

        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, images: Any, labels: Any) -> Any:
            return nn.functional.cross_entropy(self.model(images), labels)

    model = Seed().to(device, memory_format=torch.channels_last)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.requires_grad_(False)
    model.train(training)
    compiled = torch.compile if variant.exec == "compile" else (lambda f: f)
    host = (data.train_batches(split, args.batch_size, seed=0, epoch=0) if training
            else data.eval_batches(split, args.batch_size))
    batches = itertools.cycle([(torch.from_numpy(b["image"]).to(device),
                                torch.from_numpy(b["label"]).to(device, torch.long)) for b in host])

    if not training:
        predict = compiled(model)

        @torch.inference_mode()
        def evaluate() -> Any:
            images, labels = next(batches)
            return (predict(images).argmax(1) == labels).sum()

        return evaluate

    loss_fn = compiled(Loss(model))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3, eps=1e-7,
                                 fused=True if device.type == "cuda" else None)

    def train() -> Any:
        loss = loss_fn(*next(batches))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return train


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--variants", type=Variant.parse, nargs="+", default=list(map(Variant.parse,
                                                                                       DEFAULT_VARIANTS)),
                        help="IMPL:EXEC:DTYPE, IMPL in torch/torch-eval, EXEC eager/compile, DTYPE "
                             "float32/bfloat16")
    add_step_args(parser)
    parser.add_argument("--out", default="benchmarks/results/torch_step.json")
    args = parse_step_args(parser, argv)

    import torch

    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    split = synthetic_split(POOL * args.batch_size, args.native_size, args.classes)
    builders = {v: functools.partial(seed_step, v, args, split, device) for v in args.variants}
    first, times = time_steps(builders, args.warmup, args.steps,
                              lambda _: torch.cuda.synchronize() if device.type == "cuda" else None)

    evaluations = {v.dtype: v for v in args.variants if v.impl == "torch-eval"}
    train = {v: evaluations.get(v.dtype) for v in args.variants if v.impl == "torch"}
    ratios = {f"{v.exec}/{o.exec} torch {v.dtype}": median_ratio(times[v], times[o])
              for v in train for o in train if (v.exec, o.exec) == ("compile", "eager") and v.dtype == o.dtype}
    shape = f"{args.native_size} px -> {args.image_size} px, batch {args.batch_size}"
    settings = {k: v for k, v in vars(args).items() if k not in ("variants", "out")}
    accelerator = {"torch": torch.__version__, "device": str(device),
               "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
               "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
               "float32_matmul_precision": torch.get_float32_matmul_precision()}
    report(f"PyTorch seed-recipe train step ({shape})", step_rows(first, times, args, train), args.out,
           accelerator=accelerator, ratios=ratios,
           raw={"settings": settings, "step_times_s": {str(v): t for v, t in times.items()}})


if __name__ == "__main__":
    main()
