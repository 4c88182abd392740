"""P x K batch sampling for metric learning: P classes per batch, K images of each.

Usable as ``paddle.io.DataLoader(batch_sampler=...)``: the loader only iterates it and
asks its length (checked against Paddle 3.3.1), so no Paddle base class is needed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np


class PKSampler:
    """Batches of ``p`` distinct classes x ``k`` images each (length ``p * k``).

    Per epoch every class's images are shuffled and cut into groups of ``k``, so every
    image is in some group (all are yielded with ``drop_last=False``):
    - a class with fewer than ``k`` images gives one group: all its images plus repeats
      drawn with replacement (so classes of 1 image still work; their triplets reuse it);
    - a class with ``n > k`` images gives ``ceil(n / k)`` groups, the last one topped up
      with other images of the class.
    Batches then take ``p`` distinct classes, one group each. Their number ``B`` is the
    largest with ``sum_c min(groups_c, B) >= p * B`` (a class can appear at most once per
    batch), so it depends only on the class sizes: the same every epoch, about
    ``len(labels) / (p * k)`` when classes are balanced. Each epoch draws at random which
    ``p * B`` groups are used and which classes share a batch; the groups left over are
    dropped (``drop_last=True``) or yielded after them as batches of up to ``p`` groups
    whose classes may repeat (``drop_last=False``).

    The order is a pure function of ``(seed, epoch)`` (``set_epoch``), which exact resume
    needs. With ``world_size > 1`` every rank builds the same global order and takes
    batches ``rank::world_size`` after truncating to a multiple of ``world_size``, so
    ranks see disjoint batches and the same batch count.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        p: int,
        k: int,
        seed: int = 0,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"PKSampler: labels must be a non-empty 1-D integer array, "
                             f"got dtype {labels.dtype} shape {labels.shape}")
        if k < 1 or p < 1:
            raise ValueError(f"PKSampler: p (classes per batch) and k (images per class) must be >= 1, "
                             f"got p={p}, k={k}")
        if p * k < 2:
            raise ValueError(f"PKSampler: a batch of p*k={p * k} image cannot form pairs: "
                             "use at least 2 images per batch")
        classes, inverse = np.unique(labels, return_inverse=True)
        if p > len(classes):
            raise ValueError(
                f"PKSampler: a batch of {p * k} images with k={k} per class needs p={p} distinct classes, "
                f"but the labels hold only {len(classes)} classes: lower the batch size to at most "
                f"{len(classes) * k} or raise the images per class so that batch_size / k <= {len(classes)}"
            )
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"PKSampler: need world_size >= 1 and 0 <= rank < world_size, "
                             f"got rank={rank}, world_size={world_size}")
        if seed < 0:
            raise ValueError(f"PKSampler: seed must be >= 0, got {seed}")
        self.p, self.k = int(p), int(k)
        self.batch_size = self.p * self.k
        self.seed = int(seed)
        self.drop_last = drop_last
        self.rank, self.world_size = int(rank), int(world_size)
        self.num_classes = len(classes)
        order = np.argsort(inverse, kind="stable")
        bounds = np.cumsum(np.bincount(inverse, minlength=len(classes)))[:-1]
        self._members: list[np.ndarray] = np.split(order, bounds)  # dataset indices per class
        self.epoch = 0
        self._cached: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _groups(self, rng: np.random.Generator) -> list[list[np.ndarray]]:
        """Per class, its groups of ``k`` indices for this epoch."""
        k = self.k
        out = []
        for members in self._members:
            perm = rng.permutation(members)
            n = len(perm)
            if n < k:
                out.append([np.concatenate([perm, rng.choice(members, k - n, replace=True)])])
                continue
            groups = [perm[i:i + k] for i in range(0, n - n % k, k)]
            rest = perm[n - n % k:]
            if len(rest):
                filler = rng.choice(perm[:n - n % k], k - len(rest), replace=False)
                groups.append(np.concatenate([rest, filler]))
            out.append(groups)
        return out

    def global_batches(self, epoch: int) -> list[list[int]]:
        """All ranks' batches of ``epoch`` (before the distributed split)."""
        rng = np.random.default_rng([self.seed, int(epoch)])
        groups = self._groups(rng)
        counts = np.array([len(g) for g in groups], dtype=np.int64)
        n_batches = self._full_batches(counts)
        # Which groups are used: p * B of them, at most B per class, chosen at random.
        usable = np.minimum(counts, n_batches)
        pool = rng.permutation(np.repeat(np.arange(len(groups)), usable))
        todo = np.bincount(pool[:self.p * n_batches], minlength=len(groups))
        used = todo.copy()
        batches: list[list[int]] = []
        for remaining in range(n_batches, 0, -1):
            # A class with as many groups to place as batches remain must be in every one of
            # them; since sum(todo) == p * remaining and todo <= remaining there are <= p such.
            forced = np.flatnonzero(todo == remaining)
            free = np.flatnonzero((todo > 0) & (todo < remaining))
            extra = self.p - len(forced)
            weights = todo[free] / todo[free].sum() if extra else None
            picked = np.concatenate([forced, rng.choice(free, extra, replace=False, p=weights)])
            rng.shuffle(picked)
            batch = []
            for c in picked:
                todo[c] -= 1
                batch.extend(int(i) for i in groups[c][todo[c]])
            batches.append(batch)
        if not self.drop_last:
            rest = [g for c in rng.permutation(len(groups)) for g in groups[c][used[c]:]]
            for i in range(0, len(rest), self.p):
                batches.append([int(j) for g in rest[i:i + self.p] for j in g])
        return batches

    def _full_batches(self, counts: np.ndarray) -> int:
        """Largest B with sum(min(counts, B)) >= p * B: the most p-distinct-class batches."""
        n = int(counts.sum()) // self.p
        while n > 0 and int(np.minimum(counts, n).sum()) < self.p * n:
            n -= 1
        return n

    def _epoch_batches(self) -> list[list[int]]:
        if self._cached is None or self._cached[0] != self.epoch:
            batches = self.global_batches(self.epoch)
            usable = len(batches) // self.world_size * self.world_size
            self._cached = (self.epoch, batches[self.rank:usable:self.world_size])
        return self._cached[1]

    def __iter__(self) -> Iterator[list[int]]:
        yield from (list(b) for b in self._epoch_batches())

    def __len__(self) -> int:
        return len(self._epoch_batches())

    def __repr__(self) -> str:
        return (f"PKSampler(p={self.p}, k={self.k}, classes={self.num_classes}, seed={self.seed}, "
                f"drop_last={self.drop_last}, rank={self.rank}, world_size={self.world_size})")

