"""GPU training and inference throughput of UNet++ (resnet34) at 512x512 and 256x256 with mixed precision.
One command, under 5 minutes on any recent card: python bench/gpu_throughput.py
Prints the card, slices per second and peak GPU memory per setting.
"""

import time

import torch
import torch.nn.functional as F

from liverseg import models as M
from liverseg.train import soft_dice_loss


def run(size, batch, steps=20, train=True):
    dev = torch.device("cuda")
    spec = {"kind": "segmenter", "encoder": "resnet34", "encoder_depth": 5, "decoder_channels": [256, 128, 64, 32, 16],
            "in_channels": 3, "classes": 3, "encoder_weights": None}
    torch.manual_seed(0)
    model = M.build(spec).to(dev).train(train)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    x = torch.rand(batch, 3, size, size, device=dev)
    y = torch.randint(0, 3, (batch, size, size), device=dev)
    torch.cuda.reset_peak_memory_stats()
    for i in range(steps + 3):
        if i == 3:
            torch.cuda.synchronize()
            t = time.perf_counter()
        if train:
            with M.autocast(dev, True):
                out = model(x)
                loss = F.cross_entropy(out.float(), y) + soft_dice_loss(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        else:
            with torch.inference_mode(), M.autocast(dev, True):
                model(x)
    torch.cuda.synchronize()
    rate = batch * steps / (time.perf_counter() - t)
    return rate, torch.cuda.max_memory_allocated() / 2**30


def main():
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    name = torch.cuda.get_device_name(0)
    dtype = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    print(f"card: {name}; torch {torch.__version__}; autocast {dtype}")
    for size, batch in ((512, 16), (256, 64)):
        tr, tm = run(size, batch, train=True)
        ir, im = run(size, batch, train=False)
        print(f"UNet++ resnet34 {size}x{size} batch {batch}: train {tr:8.1f} slices/s (peak {tm:.1f} GiB), "
              f"inference {ir:8.1f} slices/s (peak {im:.1f} GiB)")


if __name__ == "__main__":
    main()
