"""Camera-aware re-ID metrics inside PML: a ReIDTester over query and gallery datasets.

Run: ``PYTHONPATH=. python examples/reid_pml_tester.py``. The "images" are synthetic vectors
and the trunk an identity map, so the example runs anywhere in seconds; swap in a real
dataset yielding ``(image, (pid, camid))`` and a trained trunk.
"""

import numpy as np
import torch

from evaluation.pml.reid_accuracy_calculator import ReIDAccuracyCalculator
from evaluation.pml.reid_tester import ReIDTester


class SyntheticReIDSet(torch.utils.data.Dataset):
    def __init__(self, size, num_ids=20, num_cams=4, dim=32, seed=0):
        rng = np.random.default_rng(seed)
        centres = np.random.default_rng(123).normal(size=(num_ids, dim))
        self.pids = rng.integers(0, num_ids, size)
        self.camids = rng.integers(0, num_cams, size)
        self.images = (centres[self.pids] + rng.normal(size=(size, dim))).astype(np.float32)

    def __len__(self):
        return len(self.pids)

    def __getitem__(self, index):
        return self.images[index], torch.tensor([self.pids[index], self.camids[index]])


def main():
    datasets = {"query": SyntheticReIDSet(100, seed=1), "gallery": SyntheticReIDSet(500, seed=2)}
    tester = ReIDTester(
        accuracy_calculator=ReIDAccuracyCalculator(ranks=(1, 5, 10), metric="euclidean"),
        dataloader_num_workers=0,
        batch_size=64,
    )
    accuracies = tester.test(
        datasets, epoch=1, trunk_model=torch.nn.Identity(), splits_to_eval=[("query", ["gallery"])]
    )
    for name, value in accuracies["query"].items():
        print(f"{name}: {value}")


if __name__ == "__main__":
    main()
