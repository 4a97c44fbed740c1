"""Offline training data: already-annotated rollouts read from a JSONL or Parquet file, batched by whole groups.

Each row is one rollout (``question``, ``solution``, ``answer``, ``response``; optionally ``context``,
``context_header``, ``reward``, ``logprobs``, ``response_ids``, ``group``, ``finished``, ``id``,
``policy_version``). Rows sharing a ``group`` id are the rollouts of one problem, whose GRPO advantages are
normalised together, so a group is never split: :class:`GroupBatches` shuffles groups, not rows, and packs whole
groups into micro-batches of at most ``batch_size`` rows. A row without ``group`` is a group of its own.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

from torch.utils.data import DistributedSampler

from sdlit.checkpointing import epoch_order, rank_share
from sdlit.rollout import Rollout
from sdlit.tasks.base import DataError, Problem
from sdlit.tasks.rows import file_rows

log = logging.getLogger(__name__)

OFFLINE_REQUIRED = ("question", "solution", "answer", "response")
SOURCE = "_source"  # key of the "<file>: row <n>" a checked row came from (for error messages)
GROUP = "_group"  # key of the group a checked row belongs to: ("id", its group id) or ("row", its row number)


def read_offline_rollouts(path: str, on_bad_row: str = "error") -> list[dict]:
    """Rows of an annotated-rollouts file (JSONL or Parquet), checked for the required fields."""
    return read_offline_rollouts_counted(path, on_bad_row)[0]


def read_offline_rollouts_counted(path: str, on_bad_row: str = "error") -> tuple[list[dict], int]:
    """Like :func:`read_offline_rollouts`, also returning how many bad rows were skipped
    (``on_bad_row="skip"``; ``"error"`` raises a DataError naming file, row and field on the first one)."""
    rows, skipped = [], 0
    for number, row in file_rows(Path(path)):
        try:
            rows.append(_checked_row(row, path, number))
        except DataError as err:
            if on_bad_row != "skip":
                raise
            skipped += 1
            log.warning("skipping bad offline row: %s", err)
    if not rows:
        detail = f" ({skipped} bad rows skipped)" if skipped else ""
        raise DataError(f"{path}: no rollouts in file{detail}")
    if skipped:
        log.warning("%s: skipped %d bad rows, kept %d rollouts", path, skipped, len(rows))
    return rows, skipped


def _checked_row(row, path: str, number: int) -> dict:
    """The row with its source and group recorded, or a DataError naming file, row and field."""
    if isinstance(row, DataError):
        raise row
    if not isinstance(row, dict):
        raise DataError(f"{path}: row {number}: expected an object with fields {', '.join(OFFLINE_REQUIRED)}")
    for name in OFFLINE_REQUIRED:
        if not isinstance(row.get(name), str) or not row[name].strip():
            raise DataError(f"{path}: row {number}: field {name!r} is missing or empty")
    for name in ("logprobs", "response_ids"):
        if row.get(name) is not None and not isinstance(row[name], list):
            raise DataError(f"{path}: row {number}: field {name!r} must be a list, got {type(row[name]).__name__}")
    group = row.get("group")
    if isinstance(group, (list, dict)):
        raise DataError(f"{path}: row {number}: field 'group' must be a number or a string, got {group!r}")
    return {**row, SOURCE: f"{path}: row {number}", GROUP: ("row", number) if group is None else ("id", group)}


def offline_rollout(
    row: dict, tokenizer, policy_version: int, template_kwargs: dict | None = None, group: int = 0
) -> Rollout:
    """A :class:`Rollout` from an annotated row; the response is tokenized here, once.

    ``group`` is the index of the row's group within its batch. Stored ``logprobs`` must have one value per
    response token (EOS included when appended), and stored ``response_ids`` must equal the tokenized response:
    else a DataError names the file and row.
    """
    source = row.get(SOURCE, "offline row")
    problem = Problem(row["question"], row["solution"], row["answer"], row.get("id", ""))
    rollout = Rollout.from_text(
        problem, row["response"], tokenizer, finished=row.get("finished", True), template_kwargs=template_kwargs,
        policy_version=int(row.get("policy_version", policy_version)), group=group, reward=row.get("reward"),
        context=row.get("context"), logprobs=row.get("logprobs"),
    )
    _check_stored_tokens(row, rollout.response_ids, source)  # the sampled answer ended with EOS when finished
    if row.get("context_header"):
        rollout.context_header = row["context_header"]
    return rollout


def _check_stored_tokens(row: dict, response_ids: list[int], source: str) -> None:
    """Stored per-token values must line up with the response as tokenized here."""
    stored_ids = row.get("response_ids")
    if stored_ids is not None and list(stored_ids) != response_ids:
        raise DataError(
            f"{source}: field 'response_ids' ({len(stored_ids)} ids) differs from the tokenized 'response' "
            f"({len(response_ids)} ids{', EOS appended' if row.get('finished', True) else ''}): the stored ids "
            "come from another tokenizer, or 'finished' is wrong"
        )
    logprobs = row.get("logprobs")
    if logprobs is not None and len(logprobs) != len(response_ids):
        raise DataError(
            f"{source}: field 'logprobs' has {len(logprobs)} values but the response has {len(response_ids)} tokens"
            f"{' (EOS appended: finished is true)' if row.get('finished', True) else ''}: one log-prob per "
            "response token is needed"
        )


# ---- batches of whole groups -----------------------------------------------------------------------
def group_indices(rows: list[dict], batch_size: int, path: str = "offline data") -> list[list[int]]:
    """Row indices of each group, in the order groups first appear; a group larger than ``batch_size`` is an error."""
    groups: dict[tuple, list[int]] = {}
    for index, row in enumerate(rows):
        groups.setdefault(row.get(GROUP, ("row", index)), []).append(index)
    for (_kind, key), members in groups.items():
        if len(members) > batch_size:
            raise DataError(
                f"{path}: group {key!r} has {len(members)} rollouts but data.batch_size is {batch_size}: a GRPO "
                "group must fit in one micro-batch (raise data.batch_size, or split the group)"
            )
    return list(groups.values())


def pack_groups(groups: list[list[int]], batch_size: int) -> list[list[int]]:
    """Whole groups, in order, packed into batches of at most ``batch_size`` rows (a new batch when one is full)."""
    batches, current = [], []
    for members in groups:
        if current and len(current) + len(members) > batch_size:
            batches.append(current)
            current = []
        current = current + members
    if current:
        batches.append(current)
    return batches


class GroupBatches(DistributedSampler):
    """Batches of row indices made of whole groups: each epoch the groups are shuffled by (``seed``, epoch) and
    packed into batches of at most ``batch_size`` rows (:func:`pack_groups`); rank r of W gets batches r, r + W, ...

    The order depends on nothing but (seed, epoch), so a resumed run sees the same batches. When the batches do
    not share evenly among the ranks, the first ones are repeated to fill the last round (as Lightning's
    DistributedSampler does). Being a DistributedSampler, Lightning hands it to the loader as it is.

    Args:
        groups: Row indices of each group (:func:`group_indices`).
        batch_size: Most rows of a batch.
        shuffle: Shuffle the groups every epoch; else keep their order.
        seed: Base seed of the shuffle.
        num_replicas: Number of data-parallel ranks.
        rank: This rank.
    """

    def __init__(self, groups: list[list[int]], batch_size: int, shuffle: bool = True, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0):
        super().__init__(groups, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.groups = groups
        self.batch_size = batch_size

    def epoch_batches(self) -> list[list[int]]:
        """All ranks' batches of the current epoch, in order."""
        order = epoch_order(len(self.groups), self.shuffle, self.seed, self.epoch)
        return pack_groups([self.groups[i] for i in order], self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(rank_share(self.epoch_batches(), self.num_replicas, self.rank))

    def __len__(self) -> int:
        return -(-len(self.epoch_batches()) // self.num_replicas)


class RowBatches:
    """The rows of a file, indexed by a list of row indices (a whole batch from :class:`GroupBatches`)."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, indices: list[int]) -> list[dict]:
        return [self.rows[i] for i in indices]


def batch_group_indices(rows: list[dict]) -> list[int]:
    """For each row of a batch, the index (0, 1, ...) of its group within the batch."""
    seen: dict = {}
    return [seen.setdefault(row.get(GROUP, ("row", i)), len(seen)) for i, row in enumerate(rows)]


def keep_batch(batch):
    """Collate function of a loader whose items already are whole batches."""
    return batch
