"""Placement strategies and oversubscription (pure functions)."""
import pytest

from hub_spawner.pool.scheduler import GPUState, InvalidRequest, Limits, NoFit, Request, place

G = 2**30


def gpus():
    return [GPUState("a", "w1", "n1", 16 * G, used_vram=8 * G, used_compute=50),
            GPUState("b", "w1", "n1", 16 * G),
            GPUState("c", "w2", "n2", 16 * G, used_vram=2 * G, used_compute=10)]


def test_compact_first_packs_the_busiest_gpu_that_fits():
    assert [g.uuid for g in place(Request(vram=4 * G, compute=25), gpus(), "compact-first", Limits())] == ["a"]


def test_low_load_first_spreads():
    assert [g.uuid for g in place(Request(vram=4 * G, compute=25), gpus(), "low-load-first", Limits())] == ["b"]


def test_compact_first_skips_a_gpu_without_room():
    # "a" has 8 GiB left: a 10 GiB request goes to the next busiest, "c"
    assert [g.uuid for g in place(Request(vram=10 * G, compute=25), gpus(), "compact-first", Limits())] == ["c"]


def test_oversubscription_ratios():
    full = [GPUState("a", "w", "n", 16 * G, used_vram=16 * G, used_compute=100)]
    with pytest.raises(NoFit, match="busy"):
        place(Request(vram=4 * G, compute=25), full, "compact-first", Limits())
    with pytest.raises(NoFit, match="busy"):  # memory may be promised twice, compute may not
        place(Request(vram=4 * G, compute=25), full, "compact-first", Limits(vram_oversubscription=2.0))
    chosen = place(Request(vram=4 * G, compute=25), full, "compact-first",
                   Limits(vram_oversubscription=2.0, compute_oversubscription=1.5))
    assert chosen[0].uuid == "a"


def test_high_qos_is_not_placed_on_oversubscribed_capacity():
    busy = [GPUState("a", "w", "n", 16 * G, used_vram=14 * G, used_compute=50)]
    limits = Limits(vram_oversubscription=2.0)
    assert place(Request(vram=4 * G, compute=25, qos="medium"), busy, "compact-first", limits)[0].uuid == "a"
    with pytest.raises(NoFit, match="busy"):
        place(Request(vram=4 * G, compute=25, qos="high"), busy, "compact-first", limits)


def test_local_mode_stays_on_the_users_node():
    assert [g.uuid for g in place(Request(vram=G, compute=25, mode="local", node="n2"), gpus(), "compact-first",
                                  Limits())] == ["c"]
    with pytest.raises(NoFit, match="node of your server"):
        place(Request(vram=G, mode="local", node="elsewhere"), gpus(), "compact-first", Limits())


def test_count_needs_gpus_of_one_worker():
    chosen = place(Request(vram=G, compute=25, count=2), gpus(), "low-load-first", Limits())
    assert {g.worker for g in chosen} == {"w1"} and len({g.uuid for g in chosen}) == 2
    with pytest.raises(NoFit, match="3 GPUs"):
        place(Request(vram=G, compute=25, count=3), gpus(), "low-load-first", Limits())


def test_reasons_a_user_understands():
    with pytest.raises(NoFit, match="largest GPU offers 16.0 GiB"):
        place(Request(vram=40 * G), gpus(), "compact-first", Limits())
    with pytest.raises(NoFit, match="no GPU worker"):
        place(Request(vram=G), [], "compact-first", Limits())
    for bad in (Request(vram=0), Request(vram=G, compute=0), Request(vram=G, compute=101),
                Request(vram=G, mode="moon"), Request(vram=G, qos="ultra"), Request(vram=G, count=0)):
        with pytest.raises(InvalidRequest):
            place(bad, gpus(), "compact-first", Limits())
