"""The CovMatch loss in your own plain-PyTorch distillation loop, with your own encoders.

A minimal loop in the shape of Algorithm 1: learnable synthetic images and text inputs, two small encoders of
your own, and ``covmatch_loss`` between a real batch and the synthetic set. Replace the encoders and the real
data with yours; nothing here depends on covmatch's models or data.

    python docs/examples/own_distillation_loop.py [--steps 50] [--device cpu]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from covmatch import covmatch_loss


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    device = torch.device(args.device)

    # Your encoders (here: tiny MLPs on flattened 8x8 images and on 16-d "text" vectors).
    image_encoder = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 64), nn.GELU(), nn.Linear(64, 32)).to(device)
    text_encoder = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 24)).to(device)
    for p in [*image_encoder.parameters(), *text_encoder.parameters()]:
        p.requires_grad_(False)  # only the synthetic data learns here

    # Your real data (here: random pairs whose text is a noisy function of the image).
    real_images = torch.randn(512, 3, 8, 8, device=device)
    real_text = real_images.flatten(1)[:, :16] + 0.1 * torch.randn(512, 16, device=device)

    # The synthetic set: 20 pairs, initialised from real ones.
    syn_images = real_images[:20].clone().requires_grad_(True)
    syn_text = real_text[:20].clone().requires_grad_(True)
    optimizer = torch.optim.SGD([syn_images, syn_text], lr=0.5, momentum=0.5)

    for step in range(args.steps):
        batch = torch.randint(0, 512, (128,), device=device)
        with torch.no_grad():
            real_x, real_y = image_encoder(real_images[batch]), text_encoder(real_text[batch])
        loss = covmatch_loss(real_x, real_y, image_encoder(syn_images), text_encoder(syn_text), rho=2.0, lam=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step}: covmatch loss {loss.item():.5f}")
    return loss.item()


if __name__ == "__main__":
    main()
