"""Training throughput (slices per second) of the three models as configured in a config file, on this machine.
Usage: python bench/train_throughput.py [--config config.yaml] [--steps 6] [--device auto] [--threads 2]
       [--roles classifier model_a model_b] [--set KEY=VALUE ...]
``--set`` overrides config keys (dotted path, YAML value), e.g.
  --roles model_a --set train.model_a.encoder=resnet18 "train.model_a.decoder_channels=[256,128,64,32,16]"
"""

import argparse
import time

import torch
import torch.nn.functional as F
import yaml

from liverseg import config as C
from liverseg import models as M
from liverseg.train import make_spec, soft_dice_loss


def measure(spec, batch, steps, device, amp):
    torch.manual_seed(0)
    model = M.build(spec).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    s = spec["input_size"]
    x = torch.rand(batch, spec["in_channels"], s, s, device=device)
    y = torch.randint(0, 3, (batch, s, s), device=device)
    t0 = None
    for i in range(steps + 2):  # two warm-up steps
        if i == 2:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        with M.autocast(device, amp):
            out = model(x)
            if spec["kind"] == "classifier":
                loss = F.binary_cross_entropy_with_logits(out.float(), (y[:, 0, 0] > 0).float())
            else:
                loss = F.cross_entropy(out.float(), y) + soft_dice_loss(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="config.yaml")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--roles", nargs="+", default=["classifier", "model_a", "model_b"])
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides (dotted keys)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    overrides = {}
    for item in a.set:
        key, value = item.split("=", 1)
        *parents, leaf = key.split(".")
        node = overrides
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = yaml.safe_load(value)
    cfg = C.load(a.config, overrides)
    dev = M.resolve_device(a.device)
    print(f"device {dev}, {a.threads} threads, config {a.config}" + (f", overrides {a.set}" if a.set else ""))
    for role in a.roles:
        spec = make_spec(cfg, role)
        m = cfg["train"][role]
        r = measure(spec, m["batch_size"], a.steps, dev, amp=dev.type == "cuda")
        dec = "-".join(map(str, spec.get("decoder_channels", []))) or "-"
        print(f"{role:10s} {spec['encoder']:14s} decoder {dec:18s} input {spec['input_size']:4d} "
              f"channels {spec['in_channels']} batch {m['batch_size']:3d}: {r:8.1f} slices/s")


if __name__ == "__main__":
    main()
