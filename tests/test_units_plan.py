"""Pure parts: size parsing and the shard planner, with plain integers for sizes."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reshard.errors import UsageError
from reshard.plan import plan_shards
from reshard.tensors import natural_key
from reshard.units import dtype_nbytes, format_size, parse_size
from reshard.writers.safetensors import shard_file_name


@pytest.mark.parametrize(
    "text,expected",
    [
        ("2GB", 2_000_000_000),
        ("2gb", 2_000_000_000),
        ("1.5GB", 1_500_000_000),
        ("500MB", 500_000_000),
        ("10KB", 10_000),
        ("1TB", 10**12),
        ("2GiB", 2 * 1024**3),
        ("512MiB", 512 * 1024**2),
        ("4KiB", 4096),
        ("1TiB", 1024**4),
        ("1500", 1500),
        ("1500B", 1500),
        (" 3 GB ", 3_000_000_000),
    ],
)
def test_parse_size_accepts_decimal_binary_and_plain(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["2 gigs", "GB", "-1GB", "0", "2PB", "1e9", "", "two"])
def test_parse_size_rejects_with_accepted_forms(text):
    with pytest.raises(UsageError) as e:
        parse_size(text)
    assert "2GB" in str(e.value) and "2GiB" in str(e.value)


def test_format_size_and_dtype_bytes():
    assert format_size(2_000_000_000) == "2.00 GB"
    assert format_size(999) == "999 B"
    assert dtype_nbytes("BF16", (4096, 4096)) == 33_554_432
    assert dtype_nbytes("F32", ()) == 4
    assert dtype_nbytes("F4", (3,)) == 2  # 12 bits packed into 2 bytes
    assert dtype_nbytes("F6_E2M3", (4,)) == 3


def test_natural_key_orders_layers_numerically():
    names = ["model.layers.10.w", "model.layers.2.w", "model.layers.1.w", "lm_head.weight"]
    assert sorted(names, key=natural_key) == [
        "lm_head.weight",
        "model.layers.1.w",
        "model.layers.2.w",
        "model.layers.10.w",
    ]


def test_plan_packs_in_order_up_to_the_limit():
    plan = plan_shards([("a", 4), ("b", 4), ("c", 4), ("d", 1)], max_shard_size=8)
    assert [s.names for s in plan.shards] == [("a", "b"), ("c", "d")]
    assert [s.size for s in plan.shards] == [8, 5]
    assert [s.file_name for s in plan.shards] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    assert plan.total_size == 13 and plan.is_sharded and plan.oversized == ()


def test_plan_single_shard_is_model_safetensors():
    plan = plan_shards([("a", 4), ("b", 4)], max_shard_size=8)
    assert [s.file_name for s in plan.shards] == ["model.safetensors"]
    assert not plan.is_sharded


def test_plan_oversized_tensor_gets_its_own_shard():
    plan = plan_shards([("a", 3), ("big", 20), ("b", 3), ("c", 3)], max_shard_size=10)
    assert [s.names for s in plan.shards] == [("a",), ("big",), ("b", "c")]
    assert plan.oversized == ("big",)


def test_plan_never_exceeds_the_limit_except_oversized():
    import random

    rng = random.Random(7)
    for _ in range(200):
        sizes = [(f"t{i}", rng.randint(0, 50)) for i in range(rng.randint(1, 40))]
        limit = rng.randint(1, 60)
        plan = plan_shards(sizes, limit)
        assert [n for s in plan.shards for n in s.names] == [n for n, _ in sizes]
        for s in plan.shards:
            assert s.size <= limit or len(s.names) == 1
        # Greedy: a shard plus the next shard's first tensor would not have fitted.
        by_name = dict(sizes)
        for s, nxt in zip(plan.shards, plan.shards[1:]):
            assert s.size + by_name[nxt.names[0]] > limit


def test_plan_refuses_empty_and_non_positive_limit():
    with pytest.raises(UsageError):
        plan_shards([], 10)
    with pytest.raises(UsageError):
        plan_shards([("a", 1)], 0)


def test_shard_file_name_matches_transformers():
    assert shard_file_name(1, 3) == "model-00001-of-00003.safetensors"
    assert shard_file_name(12, 100000) == "model-00012-of-100000.safetensors"


@given(
    st.lists(
        st.tuples(st.integers(0, 200), st.sampled_from(["f1", "f2", "f3", None])), min_size=1, max_size=60
    ),
    st.integers(1, 300),
)
@settings(max_examples=300, deadline=None)
def test_breaks_at_source_files_never_add_a_shard_or_pass_the_limit(items, limit):
    sizes = [(f"t{i}", n) for i, (n, _) in enumerate(items)]
    origins = [origin for _, origin in items]
    greedy = plan_shards(sizes, limit)
    plan = plan_shards(sizes, limit, origins=origins)
    assert len(plan.shards) == len(greedy.shards)
    assert [n for s in plan.shards for n in s.names] == [n for n, _ in sizes]
    assert all(s.size <= limit or len(s.names) == 1 for s in plan.shards)
    assert plan_shards(sizes, limit, origins=["f1"] * len(sizes)) == greedy  # one file: greedy


def test_contiguous_source_files_give_shards_that_each_come_from_one_file():
    """The Hub layout: two files in tensor order; greedy would mix them in one shard."""
    sizes = [(f"t{i}", 10) for i in range(10)]
    origins = ["a"] * 4 + ["b"] * 6
    greedy = plan_shards(sizes, 35)
    assert [len(s.names) for s in greedy.shards] == [3, 3, 3, 1]  # the second one mixes a and b
    plan = plan_shards(sizes, 35, origins=origins)
    assert [len(s.names) for s in plan.shards] == [3, 1, 3, 3]
    where = dict(zip((n for n, _ in sizes), origins))
    assert all(len({where[n] for n in s.names}) == 1 for s in plan.shards)
