"""Modality-balanced sampling (MCP-MedSAM): pick a modality uniformly, then a case of it,
then one of that case's samples.

A training set that mixes, say, 40 CT volumes with 4 ultrasound scans would otherwise show
the network ten CT slices for every ultrasound one; MCP-MedSAM draws the modality first so
that each modality gets the same share of the steps, whatever its number of cases.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from medsaga_components.data.decathlon import case_modalities
from medsaga_components.modalities import MODALITIES


class ModalityBalancedSampler(Sampler[int]):
    """``num_samples`` dataset indices per epoch: a modality uniformly, then a case of that
    modality uniformly, then a sample of that case uniformly (all with replacement).

    Args:
        modalities: the modality (name or index) of each sample, ``len(dataset)`` entries.
        num_samples: indices per epoch (per process under ``torchrun``).
        cases: the case (volume) of each sample; None: every sample is its own case.
        seed: the draws are a seeded sequence that continues from epoch to epoch.
        num_replicas, rank: under ``torchrun`` every process draws the same global sequence of
            ``num_samples * num_replicas`` indices and keeps every ``num_replicas``-th one from
            ``rank``, so the processes see different samples and the balance holds globally.
    """

    def __init__(self, modalities: Sequence, num_samples: int, cases: Sequence | None = None, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0) -> None:
        if not len(modalities):
            raise ValueError("ModalityBalancedSampler needs at least one sample")
        if cases is not None and len(cases) != len(modalities):
            raise ValueError(f"cases has {len(cases)} entries for {len(modalities)} samples")
        if int(num_samples) < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples!r}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        cases = list(range(len(modalities))) if cases is None else list(cases)
        grouped: dict = defaultdict(lambda: defaultdict(list))  # modality -> case -> sample indices
        for index, (modality, case) in enumerate(zip(modalities, cases)):
            grouped[modality][case].append(index)
        self.modalities = sorted(grouped, key=str)
        self._cases = [[grouped[m][c] for c in grouped[m]] for m in self.modalities]
        self.num_samples = int(num_samples)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.generator = torch.Generator().manual_seed(int(seed))

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        drawn = []
        for _ in range(self.num_samples * self.num_replicas):
            cases = self._cases[int(torch.randint(len(self._cases), (1,), generator=self.generator))]
            samples = cases[int(torch.randint(len(cases), (1,), generator=self.generator))]
            drawn.append(samples[int(torch.randint(len(samples), (1,), generator=self.generator))])
        return iter(drawn[self.rank::self.num_replicas])


def modality_balanced_loader(dataset: Dataset, dataset_json: str, batch_size: int, steps_per_epoch: int,
                             modalities: Sequence[str] | None = None, seed: int = 0, num_workers: int = 0,
                             distributed: bool = False) -> DataLoader:
    """A training DataLoader of ``steps_per_epoch`` batches drawn by :class:`ModalityBalancedSampler`.

    ``dataset``: a ``SliceDataset`` (its samples' volumes give the cases; their modalities
    come from ``dataset_json``, a case's own ``modality`` key first, see
    ``data.decathlon.case_modalities``). A batch never exceeds the number of samples, as in
    ``FewShotExperiment.train_loader``.
    """
    lookup = case_modalities(dataset_json, MODALITIES if modalities is None else modalities)
    volumes = [ref.volume for ref in dataset.slices]
    missing = sorted({v for v in volumes if v not in lookup})
    if missing:
        raise ValueError(f"{dataset_json}: samples come from volumes it does not list: {missing[:3]}")
    world, rank = 1, 0
    if distributed:
        world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    batch = min(int(batch_size), len(volumes))
    sampler = ModalityBalancedSampler([lookup[v] for v in volumes], batch * int(steps_per_epoch), cases=volumes,
                                      seed=seed, num_replicas=world, rank=rank)
    return DataLoader(dataset, batch_size=batch, sampler=sampler, drop_last=True, num_workers=num_workers)


__all__ = ["ModalityBalancedSampler", "modality_balanced_loader"]
