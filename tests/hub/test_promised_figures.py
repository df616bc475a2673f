"""Each GPU's promised figures (gpus.promised_vram, promised_compute, sessions, load), which placement
reads instead of every allocation: after any mix of placements, releases, revocations, lost workers and
registrations they equal the sums over the active allocations, and the database's choice of GPUs is
scheduler.place's choice over those sums, for both strategies."""
import random
import time

import pytest
from sqlalchemy import select

from hub_spawner.pool.allocations import AllocationBook
from hub_spawner.pool.db import GPU, Allocation, Worker
from hub_spawner.pool.scheduler import STRATEGIES, GPUState, Limits, NoFit, Request, place

G = 1 << 30


def add_worker(book, name, gpus, memory, node="n1"):
    with book.Session.begin() as db:
        w = Worker(name=name, address="tcp://10.0.0.1:7000", node=node, backend="emulated", last_seen=time.time())
        w.gpus = [GPU(uuid=f"GPU-{name}-{i}", index=i, model="test GPU", memory=memory) for i in range(gpus)]
        db.add(w)


def truth(book) -> list[GPUState]:
    """The GPUs' states summed from the active allocations, as the pool computed them before it kept
    figures: the reference."""
    with book.Session() as db:
        rows = db.execute(select(GPU, Worker).join(Worker)).all()
        states = {g.uuid: GPUState(g.uuid, w.name, w.node, g.memory, worker_status=w.status, last_seen=w.last_seen)
                  for g, w in rows}
        for a in db.scalars(select(Allocation).where(Allocation.status == "active")):
            for u in a.gpu_list:
                if u in states:
                    states[u].used_vram += a.vram
                    states[u].used_compute += a.compute
                    states[u].sessions += 1
    return sorted(states.values(), key=lambda s: s.uuid)


def kept(book) -> list[tuple]:
    with book.Session() as db:
        return [(s.uuid, s.used_vram, s.used_compute, s.sessions) for s in book.gpu_states(db)]


def expected_choice(book, req):
    try:
        return [g.uuid for g in place(req, truth(book), book.strategy, book.limits)]
    except NoFit as exc:
        return exc.constraint


def database_choice(book, req):
    try:
        with book.Session.begin() as db:
            return [u for u, _ in book._choose(db, req)]
    except NoFit as exc:
        return exc.constraint


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_kept_figures_and_the_databases_choice_follow_every_change(tmp_path, strategy):
    rng = random.Random(13)
    book = AllocationBook(f"sqlite:///{tmp_path / 'pool.sqlite'}", strategy, Limits(1.5, 2.0))
    for i in range(6):
        add_worker(book, f"w{i}", gpus=rng.choice([1, 2, 4]), memory=rng.choice([16, 40, 80]) * G, node=f"n{i % 3}")
    live: list[int] = []
    for step in range(300):
        op = rng.random()
        if op < 0.55 or not live:
            req = dict(vram=rng.choice([1, 2, 8, 20, 60]) * G, compute=rng.choice([5, 10, 25, 50, 100]),
                       count=rng.choice([1, 1, 1, 2, 4]), qos=rng.choice(["low", "medium", "high"]),
                       mode=rng.choice(["any", "any", "local"]), node=f"n{rng.randrange(3)}")
            want = expected_choice(book, Request(**req))
            assert database_choice(book, Request(**req)) == want, (step, req)
            if isinstance(want, list):
                alloc, _, _ = book.allocate({"user": f"u{step}", **req})
                assert alloc.gpu_list == want
                live.append(alloc.id)
        elif op < 0.75:
            book.release(live.pop(rng.randrange(len(live))))
        elif op < 0.85:
            book.revoke(live.pop(rng.randrange(len(live))), "test")
        elif op < 0.92:
            name = f"w{rng.randrange(6)}"
            if book.mark_lost(name, "its pod was deleted"):
                live = [a for a in live if book_status(book, a) == "active"]
            book.heartbeat(name, None)  # it comes back: its lost allocations stay lost
        else:
            name = f"w{rng.randrange(6)}"
            with book.Session() as db:
                hashes = {a.token_hash for a in db.scalars(select(Allocation).where(
                    Allocation.worker_name == name, Allocation.status == "active"))}
            book.heartbeat(name, {}, {h: "the session revoked it" for h in list(hashes)[:1]})
            live = [a for a in live if book_status(book, a) == "active"]
        assert kept(book) == [(s.uuid, s.used_vram, s.used_compute, s.sessions) for s in truth(book)], step
    book.engine.dispose()


def book_status(book, alloc_id):
    with book.Session() as db:
        return db.get(Allocation, alloc_id).status


def test_a_gpu_offered_again_is_promised_what_is_still_on_it(pool):
    """A worker registers without a GPU, then with it again before its heartbeat revoked the allocation on
    it: the GPU's figures count that allocation again, so nothing is placed on room that is taken."""
    pool.register("w1", gpus=2)
    status, alloc = pool.call("POST", "api/allocations", {"user": "ann", "vram": "16G"})
    assert status == 201
    gpu = alloc["gpus"][0]
    body = {"name": "w1", "address": "tcp://10.0.0.1:7002", "node": "n1", "backend": "emulated",
            "gpus": [{"uuid": u, "index": i, "model": "test GPU", "memory": 16 * G}
                     for i, u in enumerate(["GPU-w1-0", "GPU-w1-1"]) if u != gpu]}
    assert pool.worker_call("POST", "api/workers", body)[0] == 200
    body["gpus"].append({"uuid": gpu, "index": 1, "model": "test GPU", "memory": 16 * G})
    assert pool.worker_call("POST", "api/workers", body)[0] == 200
    used = {g["uuid"]: g["used_vram"] for g in pool.call("GET", "api/gpus")[1]}
    assert used[gpu] == 16 * G
    status, second = pool.call("POST", "api/allocations", {"user": "bob", "vram": "16G"})
    assert status == 201 and second["gpus"] != [gpu]
    assert pool.call("POST", "api/allocations", {"user": "cat", "vram": "16G"})[0] == 503


def test_a_batch_places_in_order_and_a_refusal_stops_none_of_the_others(tmp_path):
    """allocate_many: what the pool does with the requests that arrive together (placer.py)."""
    book = AllocationBook(f"sqlite:///{tmp_path / 'pool.sqlite'}", "compact-first", Limits())
    add_worker(book, "w1", gpus=1, memory=16 * G)
    results = book.allocate_many([
        {"user": "ann", "vram": "10G", "compute": 50},
        {"user": "bob", "vram": "a lot"},                  # invalid
        {"user": "cat", "vram": "10G", "compute": 10},     # no room left after ann's
        {"user": "dan", "vram": "6G", "compute": 50},      # exactly the rest
        {"user": "eve", "vram": "1G", "compute": 1}])      # full now
    ann, bob, cat, dan, eve = results
    assert ann[0].user == "ann" and ann[0].id == 1 and ann[2].name == "w1" and len(ann[1]) > 20
    assert type(bob).__name__ == "InvalidRequest" and "vram" in str(bob)
    assert isinstance(cat, NoFit) and cat.constraint == "memory"
    assert dan[0].id == 2 and dan[0].gpu_list == ["GPU-w1-0"]
    assert isinstance(eve, NoFit) and eve.constraint in ("memory", "compute")
    assert kept(book) == [("GPU-w1-0", 16 * G, 100, 2)]
    book.engine.dispose()


def test_two_replicas_ending_one_allocation_at_once_give_its_room_back_once(postgres_url):
    """PostgreSQL, two connections as two replicas: a release, a pod watch's mark_lost, an admin revoke and
    a registration's recount of the same worker, all at once, many times: the kept figures always equal
    the allocations' sums (never a room given back twice, never a release undone)."""
    import threading

    from hub_spawner.pool.allocations import recount

    books = [AllocationBook(postgres_url, "compact-first", Limits()) for _ in range(2)]
    try:
        for round_ in range(12):
            name = f"w{round_}"
            add_worker(books[0], name, gpus=2, memory=16 * G)
            allocs = [books[0].allocate({"user": f"u{i}", "vram": "4G", "compute": 25, "node": ""})[0]
                      for i in range(3)]
            barrier = threading.Barrier(4)
            errors = []

            def run(fn):
                try:
                    barrier.wait(10)
                    fn()
                except Exception as exc:  # noqa: BLE001 - the test reports what any of them raised
                    errors.append(exc)

            def reregister():
                with books[1].Session.begin() as db:
                    books[1].lock_placement(db)
                    recount(db.connection(), [name])

            jobs = [lambda: books[0].release(allocs[0].id), lambda: books[1].mark_lost(name, "its pod was deleted"),
                    lambda: books[1].revoke(allocs[1].id, "test"), reregister]
            threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert errors == []
            assert kept(books[0]) == [(s.uuid, s.used_vram, s.used_compute, s.sessions) for s in truth(books[0])]
            assert all(v >= 0 and c >= 0 and n >= 0 for _, v, c, n in kept(books[0]))
    finally:
        for b in books:
            b.engine.dispose()


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_batch_places_what_placing_one_by_one_would(request, tmp_path, strategy, database):
    """allocate_many places most of a batch from one read of the GPUs at the front of the strategy's order
    (batch_plan.py): its choices are scheduler.place's, request after request, over more GPUs than a plan
    reads, for mixed sizes, QoS, GPU counts and nodes, with releases between batches."""
    url = (f"sqlite:///{tmp_path / 'pool.sqlite'}" if database == "sqlite"
           else request.getfixturevalue("postgres_url"))
    rng = random.Random(29)
    book = AllocationBook(url, strategy, Limits(1.5, 1.0))
    for i in range(30):
        add_worker(book, f"w{i:02d}", gpus=rng.choice([1, 2, 4]), memory=rng.choice([16, 40, 80]) * G,
                   node=f"n{i % 4}")
    live: list[int] = []
    try:
        for batch in range(14):
            lab = batch % 2 == 0  # a lab's burst: vGPUs of one GPU anywhere, which the plan places alone
            specs = [dict(user=f"u{batch}-{k}", vram=rng.choice([1, 2, 8, 10, 20]) * G,
                          compute=rng.choice([5, 10, 25, 25, 50]), qos=rng.choice(["low", "medium", "high"]),
                          count=1 if lab else rng.choice([1] * 6 + [2]),
                          mode="any" if lab else rng.choice(["any"] * 4 + ["local"]),
                          node=f"n{rng.randrange(4)}") for k in range(rng.randrange(2, 40))]
            states = truth(book)  # scheduler.place, one request after the other, on the sums
            want = []
            for spec in specs:
                req = Request(**{k: v for k, v in spec.items() if k != "user"})
                try:
                    chosen = place(req, states, strategy, book.limits)
                except NoFit as exc:
                    want.append(exc.constraint)
                    continue
                for g in chosen:
                    g.used_vram += req.vram
                    g.used_compute += req.compute
                    g.sessions += 1
                want.append([g.uuid for g in chosen])
            got = book.allocate_many(specs)
            assert [r.constraint if isinstance(r, NoFit) else r[0].gpu_list for r in got] == want, batch
            assert kept(book) == [(s.uuid, s.used_vram, s.used_compute, s.sessions) for s in truth(book)], batch
            live += [r[0].id for r in got if not isinstance(r, NoFit)]
            for _ in range(len(live) // 3):
                book.release(live.pop(rng.randrange(len(live))))
    finally:
        book.close()


def test_a_batch_asks_the_database_when_a_gpu_it_did_not_read_may_come_first(tmp_path):
    """low-load-first: a plan reads the ten idlest GPUs; the one GPU among them that fits 20 GiB takes the
    first request, and then is busier than the last one read, so an idler GPU it did not read may come
    first: the second request is placed by the database, on that GPU."""
    book = AllocationBook(f"sqlite:///{tmp_path / 'pool.sqlite'}", "low-load-first", Limits())
    for i in range(9):
        add_worker(book, f"a{i}", gpus=1, memory=16 * G)
    for i in range(2):
        add_worker(book, f"b{i}", gpus=1, memory=80 * G)
    first, second = book.allocate_many([{"user": "ann", "vram": "20G", "compute": 50},
                                        {"user": "bob", "vram": "20G", "compute": 25}])
    assert (first[0].gpu_list, second[0].gpu_list) == (["GPU-b0-0"], ["GPU-b1-0"])
    book.engine.dispose()
