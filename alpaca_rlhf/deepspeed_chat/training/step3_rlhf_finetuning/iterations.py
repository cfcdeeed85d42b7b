"""The PPO iterations of a step-3 run as a resumable sequence: each iteration is --generation_batches prompt
batches, epoch after epoch. Its position (epoch, batch) goes into every checkpoint, so a resumed run sees the
batches an uninterrupted one would have seen next."""
from typing import Iterator, List

from ..utils.data.data_utils import skip_batches


class PromptIterations:
    def __init__(self, loader, generation_batches: int, epochs: int):
        self.loader, self.generation_batches, self.epochs = loader, generation_batches, epochs
        self.per_epoch = len(loader) // generation_batches  # a partial last group of batches is dropped
        self.epoch, self.batch = 0, 0  # the position: the next batch to use

    def __len__(self) -> int:
        """Iterations in the whole run."""
        return self.per_epoch * self.epochs

    def done(self) -> int:
        """Iterations already behind the current position."""
        return self.epoch * self.per_epoch + self.batch // self.generation_batches

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict):
        self.epoch, self.batch = state["epoch"], state["batch"]

    def __iter__(self) -> Iterator[List[dict]]:
        """The prompt batches of each remaining iteration. The position is already past an iteration while the
        caller handles it, so a checkpoint written then resumes with the next one."""
        while self.epoch < self.epochs:
            self.loader.sampler.set_epoch(self.epoch)
            group = []
            for batch in skip_batches(self.loader, self.batch):
                group.append(batch)
                if len(group) == self.generation_batches:
                    self.batch += len(group)
                    yield group
                    group = []
            self.epoch, self.batch = self.epoch + 1, 0
