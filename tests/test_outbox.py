"""Outbox: order and ids, restarts and crashes, bounds, degrading to memory instead of failing."""

from __future__ import annotations

import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from floorline.edge.delivery.outbox import DROP_REASONS, Outbox, OutboxConfig, OutMessage

REPO = Path(__file__).resolve().parents[1]
WAIT_S = 30.0  # bound for anything that waits on another thread or process

Msg = tuple[str, bytes, int, bool]
MakeBox = Callable[..., Outbox]


def _msgs(start: int, count: int, size: int = 10) -> list[Msg]:
    """Message i has topic t/i and a payload of ``size`` bytes that starts with i."""
    return [
        (f"t/{i}", f"{i:<{size}}".encode()[:size], 1, i % 2 == 0)
        for i in range(start, start + count)
    ]


def _held(box: Outbox) -> list[OutMessage]:
    return box.after(0, 1_000_000)


def _topics(box: Outbox) -> list[str]:
    return [m.topic for m in _held(box)]


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def box_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "outbox.sqlite"


@pytest.fixture(params=["disk", "memory"])
def make_box(request: pytest.FixtureRequest, box_path: Path) -> Iterator[MakeBox]:
    """Outboxes on disk or (path None) in memory: both must behave the same."""
    boxes: list[Outbox] = []

    def make(clock: Callable[[], float] = time.time, **config: object) -> Outbox:
        path = box_path if request.param == "disk" else None
        box = Outbox(path, OutboxConfig.model_validate(config), clock)
        assert box.mode == request.param
        boxes.append(box)
        return box

    yield make
    for box in boxes:
        box.close()


def _root_mount(*args: str | Path) -> bool:
    done = subprocess.run(["mount", *map(str, args)], capture_output=True, check=False)
    return done.returncode == 0


def _umount(target: Path) -> None:
    if subprocess.run(["umount", str(target)], capture_output=True, check=False).returncode:
        subprocess.run(["umount", "-l", str(target)], capture_output=True, check=False)


class ReadOnlyDir:
    """A directory that ``lock()`` makes read-only for this process, root included.

    Unprivileged, chmod 0o500 is enough. Root (or CAP_DAC_OVERRIDE) ignores permission bits, so a
    chmod would prove nothing there; instead the directory is bind-mounted onto itself read-only,
    which makes the kernel refuse every write with EROFS, root included: the same failure an SD
    card remounted read-only after I/O errors gives. Skips the test only if neither works.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.mounted = False

    def lock(self) -> Path:
        self.path.chmod(0o500)
        probe = self.path / "probe"
        try:
            probe.touch()
        except PermissionError:
            return self.path
        probe.unlink()
        self.path.chmod(0o700)
        if not _root_mount("--bind", self.path, self.path):
            pytest.skip("permission bits do not stop writes here and a bind mount is not allowed")
        self.mounted = True
        if not _root_mount("-o", "remount,ro,bind", self.path):
            pytest.skip("cannot remount a bind mount read-only here")
        with pytest.raises(OSError, match="Read-only"):
            probe.touch()
        return self.path

    def unlock(self) -> None:
        if self.mounted:
            _umount(self.path)
            self.mounted = False
        self.path.chmod(0o700)


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[ReadOnlyDir]:
    directory = ReadOnlyDir(tmp_path / "ro")
    directory.path.mkdir()
    yield directory
    directory.unlock()


# --- order, ids, restarts ------------------------------------------------------------------------


def test_put_after_ack_round_trip_in_id_order(make_box: MakeBox) -> None:
    box = make_box()
    ids = box.put_many(_msgs(0, 3)) + box.put_many(_msgs(3, 2))
    assert ids == sorted(ids)
    assert len(set(ids)) == 5
    held = _held(box)
    assert [m.id for m in held] == ids
    assert [m.topic for m in held] == ["t/0", "t/1", "t/2", "t/3", "t/4"]
    assert held[0].payload == b"0         "
    assert (held[0].qos, held[0].retain, held[1].retain) == (1, True, False)
    assert [m.id for m in box.after(ids[1], 2)] == ids[2:4]
    assert box.depth() == 5
    assert box.pending_bytes() == 50

    box.ack_many([ids[0], ids[2], ids[2], 10**9])  # a duplicate and an unknown id are ignored

    assert _topics(box) == ["t/1", "t/3", "t/4"]
    assert box.depth() == 3
    assert box.pending_bytes() == 30


def test_ids_keep_increasing_when_everything_was_acked_and_reopened(box_path: Path) -> None:
    with Outbox(box_path, OutboxConfig()) as box:
        first = box.put_many(_msgs(0, 3))
        box.ack_many(first)
        assert box.depth() == 0
        second = box.put_many(_msgs(3, 1))
        box.ack_many(second)
    with Outbox(box_path, OutboxConfig()) as box:
        third = box.put_many(_msgs(4, 1))
    assert first[-1] < second[0] < third[0]


def test_pending_messages_survive_a_restart_in_order(box_path: Path) -> None:
    with Outbox(box_path, OutboxConfig()) as box:
        ids = box.put_many(_msgs(0, 5, size=7))
        box.ack_many([ids[1], ids[3]])
        before = _held(box)
    with Outbox(box_path, OutboxConfig()) as box:
        assert box.mode == "disk"
        assert _held(box) == before
        assert [m.topic for m in before] == ["t/0", "t/2", "t/4"]
        assert box.depth() == 3
        assert box.pending_bytes() == 21


_WRITER = """
import sys
from pathlib import Path
from floorline.edge.delivery.outbox import Outbox, OutboxConfig

box = Outbox(Path(sys.argv[1]), OutboxConfig())
assert box.mode == "disk", box.degraded_reason
n, i = int(sys.argv[2]), 0
while i < n:
    batch = [(f"t/{j}", b"payload-%d" % j, 1, False) for j in range(i, min(n, i + 1 + i % 4))]
    box.put_many(batch)
    i += len(batch)
print("done", flush=True)
sys.stdin.read()  # wait to be killed; never close() the outbox
"""


def test_messages_put_before_a_sigkill_are_all_there_after_reopening(box_path: Path) -> None:
    n = 100
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(box_path), str(n)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            ready = sel.select(WAIT_S)
        line = proc.stdout.readline() if ready else b""
        proc.kill()
        proc.wait(WAIT_S)
        assert line == b"done\n", proc.stderr.read() if proc.stderr else b""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT_S)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    assert proc.returncode == -signal.SIGKILL
    # Nothing closed the database, so the writes are still in the WAL: reopening must replay it.
    assert box_path.with_name(box_path.name + "-wal").stat().st_size > 0

    with Outbox(box_path, OutboxConfig()) as box:
        held = _held(box)
    assert [m.topic for m in held] == [f"t/{j}" for j in range(n)]
    assert [m.payload for m in held] == [b"payload-%d" % j for j in range(n)]
    assert [m.id for m in held] == sorted({m.id for m in held})


# --- bounds --------------------------------------------------------------------------------------


def test_max_bytes_drops_the_oldest_and_counts_them(make_box: MakeBox) -> None:
    box = make_box(max_bytes=100)
    for i in range(10):
        box.put_many(_msgs(i, 1, size=30))
    assert _topics(box) == ["t/7", "t/8", "t/9"]
    assert box.pending_bytes() == 90
    assert box.depth() == 3
    assert box.dropped["max_bytes"] == 7

    # A batch larger than the bound keeps only its newest messages that fit.
    box.put_many(_msgs(10, 5, size=30))
    assert _topics(box) == ["t/12", "t/13", "t/14"]
    assert box.dropped["max_bytes"] == 12


def test_expire_drops_messages_older_than_max_age(make_box: MakeBox) -> None:
    clock = FakeClock()
    start = clock.now
    box = make_box(clock=clock, max_age_s=60)
    for step in range(4):  # put at start + 0, 20, 40, 60
        clock.now = start + 20 * step
        box.put_many(_msgs(step, 1))

    clock.now = start + 100  # ages 100, 80, 60, 40
    assert box.expire() == 2
    assert _topics(box) == ["t/2", "t/3"]  # exactly max_age_s old is not older
    assert box.dropped["max_age"] == 2
    assert box.depth() == 2
    assert box.pending_bytes() == 20

    clock.now += 0.5
    assert box.expire() == 1
    assert _topics(box) == ["t/3"]
    assert box.dropped["max_age"] == 3


def test_memory_mode_is_bounded_by_memory_max_messages() -> None:
    box = Outbox(None, OutboxConfig(memory_max_messages=3))
    ids = box.put_many(_msgs(0, 2)) + box.put_many(_msgs(2, 3))
    assert _topics(box) == ["t/2", "t/3", "t/4"]
    assert [m.id for m in _held(box)] == ids[2:]
    assert box.dropped == {"max_bytes": 0, "max_age": 0, "memory_full": 2}
    assert box.depth() == 3
    assert box.degraded_reason is None  # memory by choice is not degraded


def test_drop_counters_start_with_every_reason_at_zero(make_box: MakeBox) -> None:
    assert make_box().dropped == dict.fromkeys(DROP_REASONS, 0)


def test_config_rejects_unknown_keys_and_nonsense_bounds() -> None:
    with pytest.raises(ValidationError, match="extra"):
        OutboxConfig.model_validate({"max_byte": 10})
    with pytest.raises(ValidationError, match="max_age_s"):
        OutboxConfig(max_age_s=0)


def test_closed_outbox_refuses_puts_and_ignores_late_acks(box_path: Path) -> None:
    box = Outbox(box_path, OutboxConfig())
    ids = box.put_many(_msgs(0, 2))
    box.close()
    box.ack_many(ids)  # broker acks can race a shutdown
    with pytest.raises(RuntimeError, match="closed"):
        box.put_many(_msgs(2, 1))
    with Outbox(box_path, OutboxConfig()) as reopened:
        assert _topics(reopened) == ["t/0", "t/1"]


# --- degrading -----------------------------------------------------------------------------------


def _assert_works_in_memory(box: Outbox, already: list[str]) -> None:
    """put/after/ack keep their semantics after a fall back to memory."""
    last = max((m.id for m in _held(box)), default=0)
    ids = box.put_many(_msgs(100, 3))
    assert ids[0] > last
    assert ids == sorted(ids)
    assert _topics(box) == [*already, "t/100", "t/101", "t/102"]
    box.ack_many([ids[1]])
    assert _topics(box) == [*already, "t/100", "t/102"]
    assert box.depth() == len(already) + 2


def test_state_directory_that_cannot_be_created_falls_back_to_memory() -> None:
    # Nothing, not even root, can create a directory in /proc: an honest "cannot create".
    if not Path("/proc/self").is_dir():
        pytest.skip("needs Linux /proc")
    path = Path("/proc/self/floorline-state/outbox.sqlite")
    with Outbox(path, OutboxConfig()) as box:
        assert box.mode == "memory"
        assert box.degraded_reason is not None
        assert str(path) in box.degraded_reason
        _assert_works_in_memory(box, [])


def test_read_only_state_directory_falls_back_to_memory(read_only_dir: ReadOnlyDir) -> None:
    path = read_only_dir.lock() / "outbox.sqlite"
    with Outbox(path, OutboxConfig()) as box:
        assert box.mode == "memory"
        assert box.degraded_reason is not None
        assert "unable to open" in box.degraded_reason
        _assert_works_in_memory(box, [])
    assert not path.exists()


def test_outbox_in_a_directory_gone_read_only_carries_its_messages_into_memory(
    read_only_dir: ReadOnlyDir,
) -> None:
    path = read_only_dir.path / "outbox.sqlite"
    with Outbox(path, OutboxConfig()) as box:
        ids = box.put_many(_msgs(0, 4))
        box.ack_many([ids[0]])
    read_only_dir.lock()

    with Outbox(path, OutboxConfig()) as box:
        assert box.mode == "memory"
        assert box.degraded_reason is not None
        assert [m.id for m in _held(box)] == ids[1:]
        assert box.pending_bytes() == 30
        _assert_works_in_memory(box, ["t/1", "t/2", "t/3"])


def _fill_until_degraded(box: Outbox, size: int) -> list[str]:
    """Put one message at a time until the disk gives out; the topics put, all of them."""
    assert box.mode == "disk"
    topics: list[str] = []
    for i in range(1000):
        box.put_many(_msgs(i, 1, size=size))
        topics.append(f"t/{i}")
        if box.mode == "memory":
            return topics
    pytest.fail("the disk never filled up")


def test_full_disk_degrades_to_memory_and_keeps_every_message(box_path: Path) -> None:
    # max_page_count makes SQLite answer SQLITE_FULL exactly as a full filesystem does.
    with Outbox(box_path, OutboxConfig(), _max_page_count=16) as box:
        topics = _fill_until_degraded(box, size=1000)
        assert len(topics) > 3  # some were held on disk before it filled
        assert box.degraded_reason is not None
        assert "full" in box.degraded_reason
        assert _topics(box) == topics
        assert box.depth() == len(topics)
        assert box.pending_bytes() == 1000 * len(topics)
        _assert_works_in_memory(box, topics)

    # The file is left as it was, so what it held is sent again after a restart (at least once).
    with Outbox(box_path, OutboxConfig()) as box:
        assert box.mode == "disk"
        assert _topics(box) == topics[:-1]


@pytest.fixture
def small_tmpfs(tiny_disk: Callable[[str], Path]) -> Path:
    return tiny_disk("256k")


def test_really_full_filesystem_degrades_to_memory_and_keeps_every_message(
    small_tmpfs: Path,
) -> None:
    with Outbox(small_tmpfs / "outbox.sqlite", OutboxConfig()) as box:
        topics = _fill_until_degraded(box, size=2000)
        assert len(topics) > 3
        assert box.degraded_reason is not None
        assert "full" in box.degraded_reason
        assert _topics(box) == topics
        _assert_works_in_memory(box, topics)


def test_degraded_memory_keeps_only_the_newest_that_fit(box_path: Path) -> None:
    config = OutboxConfig(memory_max_messages=4)
    with Outbox(box_path, config, _max_page_count=16) as box:
        topics = _fill_until_degraded(box, size=1000)
        assert _topics(box) == topics[-4:]
        assert box.dropped["memory_full"] == len(topics) - 4
        assert box.depth() == 4


# --- corruption ----------------------------------------------------------------------------------


def test_file_that_is_not_a_database_is_moved_aside_and_replaced(box_path: Path) -> None:
    box_path.parent.mkdir(parents=True)
    garbage = np.random.default_rng(0).bytes(8192)
    box_path.write_bytes(garbage)
    wal = box_path.with_name(box_path.name + "-wal")
    wal.write_bytes(b"junk" * 100)
    clock = FakeClock(1_700_000_000.7)

    with Outbox(box_path, OutboxConfig(), clock) as box:
        aside = box_path.with_name("outbox.sqlite.corrupt-1700000000")
        assert box.moved_aside == aside
        assert aside.read_bytes() == garbage
        assert aside.with_name(aside.name + "-wal").read_bytes() == b"junk" * 100
        assert box.mode == "disk"
        assert box.depth() == 0
        box.put_many(_msgs(0, 2))

    with Outbox(box_path, OutboxConfig(), clock) as box:
        assert box.moved_aside is None
        assert _topics(box) == ["t/0", "t/1"]


def test_damaged_payload_page_is_found_at_open_and_the_file_moved_aside(box_path: Path) -> None:
    with Outbox(box_path, OutboxConfig()) as box:
        box.put_many(_msgs(0, 3, size=20000))
    data = box_path.read_bytes()
    box_path.write_bytes(data[:-4096] + b"\xff" * 4096)  # the last page: the end of a payload

    with Outbox(box_path, OutboxConfig()) as box:
        assert box.moved_aside is not None
        assert box.moved_aside.name.startswith("outbox.sqlite.corrupt-")
        assert box.moved_aside.read_bytes()[-4096:] == b"\xff" * 4096
        assert box.mode == "disk"
        assert box.depth() == 0
        assert _topics(box) == []
        box.put_many(_msgs(0, 1))
        assert _topics(box) == ["t/0"]


def test_damaged_free_page_is_found_at_open_not_at_the_next_put(box_path: Path) -> None:
    with Outbox(box_path, OutboxConfig()) as box:
        ids = box.put_many(_msgs(0, 3, size=20000))
        box.ack_many(ids[:2])  # their pages go to the free list
    data = bytearray(box_path.read_bytes())
    trunk = int.from_bytes(data[32:36], "big")  # file header: first free-list trunk page
    assert trunk > 1
    data[(trunk - 1) * 4096 : trunk * 4096] = b"\xff" * 4096
    box_path.write_bytes(bytes(data))

    # Reading the pending messages never touches a free page; only checking every page does.
    with Outbox(box_path, OutboxConfig()) as box:
        assert box.moved_aside is not None
        assert box.mode == "disk"
        box.put_many(_msgs(0, 1, size=20000))
        assert _topics(box) == ["t/0"]


def test_corrupt_files_moved_aside_in_the_same_second_keep_distinct_names(box_path: Path) -> None:
    box_path.parent.mkdir(parents=True)
    clock = FakeClock(1_700_000_000.0)
    asides = []
    for content in (b"first" * 200, b"second" * 200):
        box_path.write_bytes(content)
        with Outbox(box_path, OutboxConfig(), clock) as box:
            assert box.moved_aside is not None
            asides.append(box.moved_aside)
        box_path.unlink()
    assert [p.read_bytes()[:6] for p in asides] == [b"firstf", b"second"]


# --- threads -------------------------------------------------------------------------------------


def test_counters_stay_exact_under_concurrent_puts_acks_and_drops(box_path: Path) -> None:
    box = Outbox(box_path, OutboxConfig(max_bytes=6000))
    writers_done = threading.Event()
    put_ids: list[list[int]] = [[] for _ in range(4)]
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        rng = np.random.default_rng(n)
        try:
            for i in range(100):
                count, size = int(rng.integers(1, 6)), int(rng.integers(1, 41))
                put_ids[n] += box.put_many(_msgs(1000 * n + 10 * i, count, size=size))
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    def acker() -> None:
        last = 0
        try:
            while True:
                done = writers_done.is_set()
                batch = box.after(last, 20)
                if batch:
                    last = batch[-1].id
                    box.ack_many(m.id for m in batch if m.id % 3)
                elif done:
                    return
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    writers = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    ack_thread = threading.Thread(target=acker)
    for thread in [*writers, ack_thread]:
        thread.start()
    for thread in writers:
        thread.join(WAIT_S)
    writers_done.set()
    ack_thread.join(WAIT_S)
    assert not any(t.is_alive() for t in [*writers, ack_thread])
    assert errors == []
    assert box.mode == "disk"

    all_ids = [i for ids in put_ids for i in ids]
    assert len(set(all_ids)) == len(all_ids)
    assert all(ids == sorted(ids) for ids in put_ids)
    assert box.dropped["max_bytes"] > 0  # trimming raced with the others too
    held = _held(box)
    assert box.depth() == len(held)
    assert box.pending_bytes() == sum(len(m.payload) for m in held) <= 6000
    depth, size = box.depth(), box.pending_bytes()
    box.close()

    with Outbox(box_path, OutboxConfig(max_bytes=6000)) as reopened:
        assert (reopened.depth(), reopened.pending_bytes()) == (depth, size)
        assert _held(reopened) == held


def test_reads_served_from_the_in_memory_tail_equal_the_table(box_path: Path) -> None:
    # `after` past the newest puts is answered from memory; every answer must equal the table's,
    # through acks, byte-bound trims, expiry, and puts beyond the tail's size.
    import random  # noqa: PLC0415
    import sqlite3  # noqa: PLC0415

    rng = random.Random(7)  # noqa: S311 - a test's reproducible choices
    clock = FakeClock()
    config = OutboxConfig.model_validate({"max_bytes": 100_000, "max_age_s": 5_000})
    box = Outbox(box_path, config, clock)
    table = sqlite3.connect(box_path)

    def from_table(last: int, limit: int) -> list[tuple[int, str, bytes]]:
        return table.execute(
            "SELECT id, topic, payload FROM outbox WHERE id > ? ORDER BY id LIMIT ?", (last, limit)
        ).fetchall()

    try:
        n = 0
        for turn in range(300):
            count = rng.choice([1, 5, 30, 600])
            box.put_many(_msgs(n, count, size=rng.choice([10, 300])))
            n += count
            pending = [m.id for m in _held(box)]
            box.ack_many(rng.sample(pending, k=min(len(pending), rng.randint(0, 40))))
            if turn % 50 == 49:
                clock.now += 10_000
                box.expire()
            for last in {0, *rng.sample(range(n + 2), k=5)}:
                limit = rng.choice([1, 10, 100, 5000])
                got = [(m.id, m.topic, m.payload) for m in box.after(last, limit)]
                assert got == from_table(last, limit), (turn, last, limit)
        assert box.depth() == table.execute("SELECT count(*) FROM outbox").fetchone()[0]
    finally:
        table.close()
        box.close()
