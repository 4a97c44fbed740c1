"""Offline rollouts: GRPO groups stay whole in one micro-batch (shuffled as groups), a row without a group is a
group of its own, and stored log-probs / token ids must line up with the tokenized response."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
import torch

from sdlit.data import RolloutDataModule
from sdlit.objectives import group_advantages
from sdlit.offline import GroupBatches, batch_group_indices, offline_rollout, read_offline_rollouts
from sdlit.settings import SamplingSettings
from sdlit.tasks.base import DataError

from conftest import build_tokenizer


def row(i: int, group=None, **extra) -> dict:
    out = {"question": f"What is {i} + 1?", "solution": f"{i}+1=<<{i}+1={i + 1}>>{i + 1}\n#### {i + 1}",
           "answer": str(i + 1), "response": f"Step 1: {i} + 1 = {i + 1}\nAnswer: {i + 1}", "reward": float(i % 2),
           "id": f"row{i}", **extra}
    if group is not None:
        out["group"] = group
    return out


def write(tmp_path, rows, name="rollouts.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def batches_of(path, batch_size, epoch=0, shuffle=True):
    dm = RolloutDataModule(offline_path=path, batch_size=batch_size, shuffle=shuffle)
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return list(loader)


def test_groups_stay_whole_and_are_shuffled_as_groups(tmp_path):
    # groups of 3 scattered over the file (rows of one group are not adjacent)
    rows = [row(i, group=f"g{i % 4}") for i in range(12)]
    path = write(tmp_path, rows)
    orders = set()
    for epoch in range(4):
        batches = batches_of(path, batch_size=6, epoch=epoch)
        assert sorted(r["id"] for b in batches for r in b) == sorted(r["id"] for r in rows)  # each row once
        for batch in batches:
            assert len(batch) == 6
            members = defaultdict(set)
            for r, index in zip(batch, batch_group_indices(batch), strict=False):
                members[index].add(r["group"])
            assert all(len(g) == 1 for g in members.values())  # one batch index per file group
            assert sorted(r["group"] for r in batch).count(batch[0]["group"]) == 3  # the whole group
        orders.add(tuple(r["id"] for b in batches for r in b))
    assert len(orders) > 1  # a different order of groups in different epochs


def test_a_row_without_group_is_its_own_group(tmp_path):
    rows = [row(0), row(1), row(2, group=7), row(3, group=7)]
    batch = batches_of(write(tmp_path, rows), batch_size=4, shuffle=False)[0]
    tokenizer = build_tokenizer()
    groups = batch_group_indices(batch)
    rollouts = [offline_rollout(r, tokenizer, 0, group=g) for r, g in zip(batch, groups, strict=False)]
    assert len({rollouts[0].group, rollouts[1].group}) == 2
    assert rollouts[2].group == rollouts[3].group != rollouts[0].group
    rewards = torch.tensor([r.reward for r in rollouts])
    advantages = group_advantages(rewards, torch.tensor([r.group for r in rollouts]))
    assert advantages[0] == 0 and advantages[1] == 0  # a lone rollout has no group to be compared with
    assert advantages[2] < 0 < advantages[3]


def test_a_group_larger_than_the_batch_names_file_and_group(tmp_path):
    path = write(tmp_path, [row(i, group="big") for i in range(5)] + [row(9)], name="grouped.jsonl")
    with pytest.raises(DataError, match=r"grouped\.jsonl: group 'big' has 5 rollouts but data\.batch_size is 4"):
        batches_of(path, batch_size=4)


def test_ranks_get_whole_groups_and_together_every_row(tmp_path):
    rows = [row(i, group=i // 2) for i in range(16)]
    rows = read_offline_rollouts(write(tmp_path, rows))
    from sdlit.offline import group_indices

    groups = group_indices(rows, 4)
    seen = []
    for rank in range(2):
        sampler = GroupBatches(groups, 4, shuffle=True, seed=3, num_replicas=2, rank=rank)
        sampler.set_epoch(1)
        assert len(sampler) == 2
        for indices in sampler:
            assert len(indices) == 4 and all(rows[i]["group"] == rows[indices[0]]["group"] for i in indices[:2])
            assert {rows[i]["group"] for i in indices} == {rows[indices[0]]["group"], rows[indices[2]]["group"]}
            seen += indices
    assert sorted(seen) == list(range(16))


def test_online_rollouts_of_a_problem_share_one_micro_batch(tiny_model_dir):
    from types import SimpleNamespace

    from sdlit.module import SelfDistillationModule
    from sdlit.tasks.arith import Arith

    module = SelfDistillationModule(model=tiny_model_dir, lora=None, objective="grpo")
    module.configure_model()
    dm = RolloutDataModule(task=Arith(train_size=4), batch_size=2, rollouts_per_problem=4,
                           sampling=SamplingSettings(max_new_tokens=4))
    dm.trainer = SimpleNamespace(callbacks=[])
    problems = Arith(train_size=4).train_problems()[:2]
    rollouts = dm.annotated_rollouts(problems, module)
    assert [r.group for r in rollouts] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [r.problem.id for r in rollouts] == [problems[0].id] * 4 + [problems[1].id] * 4


# ---- stored per-token values -----------------------------------------------------------------------
def test_stored_logprobs_of_the_wrong_length_name_file_and_row(tmp_path):
    tokenizer = build_tokenizer()
    good = row(0)
    n = len(tokenizer(good["response"], add_special_tokens=False)["input_ids"]) + 1  # + EOS
    path = write(tmp_path, [{**good, "logprobs": [-0.5] * n}, {**good, "logprobs": [-0.5] * (n - 1)}], "lp.jsonl")
    first, second = read_offline_rollouts(path)
    assert offline_rollout(first, tokenizer, 0).logprobs == [-0.5] * n
    with pytest.raises(DataError, match=rf"lp\.jsonl: row 2: field 'logprobs' has {n - 1} values but the response "
                                        rf"has {n} tokens"):
        offline_rollout(second, tokenizer, 0)


def test_stored_response_ids_must_match_the_tokenized_response(tmp_path):
    tokenizer = build_tokenizer()
    good = row(0)
    ids = tokenizer(good["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    path = write(tmp_path, [{**good, "response_ids": ids}, {**good, "response_ids": ids[:-1]}], "ids.jsonl")
    first, second = read_offline_rollouts(path)
    assert offline_rollout(first, tokenizer, 0).response_ids == ids
    with pytest.raises(DataError, match=r"ids\.jsonl: row 2: field 'response_ids'"):
        offline_rollout(second, tokenizer, 0)


def test_stored_logprobs_must_be_a_list(tmp_path):
    path = write(tmp_path, [{**row(0), "logprobs": "0.1 0.2"}], "bad.jsonl")
    with pytest.raises(DataError, match=r"bad\.jsonl: row 1: field 'logprobs' must be a list"):
        read_offline_rollouts(path)
