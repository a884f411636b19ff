"""Train a small MLP on scikit-learn's digits with LM-Softmax, then measure its margins.

python3 examples/quickstart.py [--steps 150]
"""

from __future__ import annotations

import argparse
import math

import torch
from sklearn.datasets import load_digits

from pml_largest_margin import margins
from pml_largest_margin.losses import LargestMarginSoftmaxLoss


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--embedding-size", type=int, default=32)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    digits = load_digits()
    features = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target)
    num_classes = int(labels.max()) + 1

    model = torch.nn.Sequential(
        torch.nn.Linear(features.shape[1], 128),
        torch.nn.ReLU(),
        torch.nn.Linear(128, args.embedding_size),
    )
    loss_fn = LargestMarginSoftmaxLoss(num_classes, args.embedding_size, scale=32.0)
    optimizer = torch.optim.Adam([*model.parameters(), *loss_fn.parameters()], lr=1e-2)

    for step in range(1, args.steps + 1):
        batch = torch.randint(0, len(labels), (128,))
        loss = loss_fn(model(features[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == 1 or step % 50 == 0 or step == args.steps:
            print(f"step {step:4d}  LM-Softmax loss {loss.item():+.4f}")

    with torch.no_grad():
        sample = margins.sample_margins(model(features), labels, loss_fn.W)
    class_margin = margins.class_margin(loss_fn.W)
    bound = margins.class_margin_upper_bound(num_classes, args.embedding_size)
    print(
        f"class margin {class_margin.degrees:.1f}° (upper bound {math.degrees(bound):.1f}°, "
        f"closest pair {class_margin.closest_pair})"
    )
    print(
        f"sample margin: mean {sample.mean().item():.3f}, min {sample.min().item():.3f} "
        f"(upper bound on the min {margins.sample_margin_upper_bound(num_classes):.3f})"
    )


if __name__ == "__main__":
    main()
