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
    with pytest.raises(NoFit, match="free memory"):
        place(Request(vram=4 * G, compute=25), full, "compact-first", Limits())
    with pytest.raises(NoFit, match="compute is promised"):  # memory may be promised twice, compute may not
        place(Request(vram=4 * G, compute=25), full, "compact-first", Limits(vram_oversubscription=2.0))
    chosen = place(Request(vram=4 * G, compute=25), full, "compact-first",
                   Limits(vram_oversubscription=2.0, compute_oversubscription=1.5))
    assert chosen[0].uuid == "a"


def test_high_qos_is_not_placed_on_oversubscribed_capacity():
    busy = [GPUState("a", "w", "n", 16 * G, used_vram=14 * G, used_compute=50)]
    limits = Limits(vram_oversubscription=2.0)
    assert place(Request(vram=4 * G, compute=25, qos="medium"), busy, "compact-first", limits)[0].uuid == "a"
    with pytest.raises(NoFit, match="the most free is 2 GiB"):  # the card itself, not the promise
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


def nofit(req, states, limits=Limits()) -> NoFit:
    with pytest.raises(NoFit) as err:
        place(req, states, "compact-first", limits)
    return err.value


def test_memory_shortage_names_memory_with_numbers():
    # "a" has 8 GiB free, "b" 3.5 GiB: 10 GiB fits nowhere, and compute is plentiful
    states = [GPUState("a", "w1", "n1", 16 * G, used_vram=8 * G, used_compute=10),
              GPUState("b", "w1", "n1", 16 * G, used_vram=int(12.5 * G), used_compute=10)]
    e = nofit(Request(vram=10 * G, compute=25), states)
    assert (e.constraint, e.need, e.free) == ("memory", 10 * G, 8 * G)
    assert str(e) == ("No GPU has 10 GiB of free memory right now (the most free is 8 GiB). "
                      "Pick a smaller memory option or try again later.")
    assert e.why.startswith("no GPU has 10 GiB") and e.to_json()["message"] == str(e)


def test_compute_shortage_is_not_called_a_memory_shortage():
    # plenty of memory, but "a" has 25% compute left and "b" 10%
    states = [GPUState("a", "w1", "n1", 16 * G, used_vram=G, used_compute=75),
              GPUState("b", "w1", "n1", 16 * G, used_compute=90)]
    e = nofit(Request(vram=2 * G, compute=50), states)
    assert (e.constraint, e.need, e.free) == ("compute", 50, 25)
    assert str(e).startswith("All GPUs' compute is promised: your profile needs 50% and the most free is 25%.")
    assert "memory" not in str(e)


def test_compute_counts_only_gpus_with_room_in_memory():
    # "a" has the compute but no memory; "b" has the memory but only 10% compute: compute is what is short
    states = [GPUState("a", "w1", "n1", 16 * G, used_vram=15 * G), GPUState("b", "w1", "n1", 16 * G,
                                                                           used_compute=90)]
    e = nofit(Request(vram=4 * G, compute=25), states)
    assert (e.constraint, e.free) == ("compute", 10)


def test_a_profile_larger_than_any_gpu():
    e = nofit(Request(vram=40 * G), gpus())
    assert (e.constraint, e.need, e.free) == ("size", 40 * G, 16 * G)
    assert "asks for 40 GiB of GPU memory but the largest GPU here offers 16 GiB" in str(e)


def test_number_of_gpus():
    e = nofit(Request(vram=G, compute=25, count=3), gpus())
    assert (e.constraint, e.need, e.free) == ("count", 3, 2)
    busy = [GPUState("a", "w1", "n1", 16 * G, used_compute=100), GPUState("b", "w1", "n1", 16 * G)]
    e = nofit(Request(vram=G, compute=25, count=2), busy)
    assert (e.constraint, e.need, e.free) == ("count", 2, 1) and "right now" in str(e)


def test_no_workers_lost_workers_and_the_wrong_node():
    e = nofit(Request(vram=G), [])
    assert e.constraint == "no-workers" and str(e).startswith("No GPU worker has registered")
    lost = [GPUState("a", "w1", "n1", 16 * G, worker_status="lost", last_seen=1_700_000_000)]
    e = nofit(Request(vram=G), lost)
    assert e.constraint == "lost" and str(e).startswith("GPU worker w1 stopped responding at ")
    assert "no other GPU worker is up" in str(e)
    e = nofit(Request(vram=G, mode="local", node="n1"), lost + gpus()[2:])  # n2 is up, but not n1
    assert e.constraint == "lost" and "the only GPU worker on the node of your server" in str(e)
    e = nofit(Request(vram=G, mode="local", node="n9"), gpus())
    assert e.constraint == "node" and "(n9)" in str(e) and "Pick a remote profile" in str(e)


def test_lost_workers_take_nothing():
    states = [GPUState("a", "w1", "n1", 16 * G, worker_status="lost"), GPUState("c", "w2", "n2", 16 * G)]
    assert [g.uuid for g in place(Request(vram=G), states, "low-load-first", Limits())] == ["c"]


def test_reasons_a_user_understands():
    for bad in (Request(vram=0), Request(vram=G, compute=0), Request(vram=G, compute=101),
                Request(vram=G, mode="moon"), Request(vram=G, qos="ultra"), Request(vram=G, count=0)):
        with pytest.raises(InvalidRequest):
            place(bad, gpus(), "compact-first", Limits())
