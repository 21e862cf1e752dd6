"""The CovMatch loss inside a ``torch.compile``d training step.

The forward of the step (encoders and loss) is compiled once and reused, the backward runs through the
compiled graph's autograd. On CPU tensors ``covmatch_loss`` takes the torch path, which compiles with the rest;
on CUDA tensors it takes the fused Triton path, the ``torch.library`` op ``covmatch::fused_loss``, which the
compiler traces as one node of the graph (no graph break: ``fullgraph=True`` works).

    python docs/examples/compiled_step.py [--steps 20] [--device cpu] [--compile-backend inductor]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from covmatch import CovMatchLoss


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager: no codegen)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    device = torch.device(args.device)

    image_encoder = nn.Linear(48, 32).to(device)
    text_encoder = nn.Linear(16, 24).to(device)
    loss_fn = CovMatchLoss(rho=1.0, lam=0.1)
    syn_images = torch.randn(16, 48, device=device, requires_grad=True)
    syn_text = torch.randn(16, 16, device=device, requires_grad=True)
    optimizer = torch.optim.SGD([syn_images, syn_text], lr=0.1)

    @torch.compile(backend=args.compile_backend)
    def step_loss(real_images: torch.Tensor, real_text: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            real_x, real_y = image_encoder(real_images), text_encoder(real_text)
        return loss_fn(real_x, real_y, image_encoder(syn_images), text_encoder(syn_text))

    for i in range(args.steps):
        real_images, real_text = torch.randn(64, 48, device=device), torch.randn(64, 16, device=device)
        optimizer.zero_grad(set_to_none=True)
        loss = step_loss(real_images, real_text)
        loss.backward()
        optimizer.step()
        if i % 5 == 0 or i == args.steps - 1:
            print(f"step {i}: covmatch loss {loss.item():.5f}")
    return loss.item()


if __name__ == "__main__":
    main()
