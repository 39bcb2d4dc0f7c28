import os

import pytest

from udrv.journal import JournalFull, TxJournal


def test_append_take_confirm():
    j = TxJournal(8, 256)
    seqs = [j.append(bytes([i]) * 20) for i in range(5)]
    assert seqs == [0, 1, 2, 3, 4]
    assert j.take_unsent() == (0, b"\x00" * 20)
    assert j.take_unsent() == (1, b"\x01" * 20)
    assert j.in_device() == 2 and j.unsent() == 3
    assert j.confirm_through(0) == 1
    assert j.unconfirmed() == 4


def test_full_and_wraparound():
    j = TxJournal(4, 128)
    for i in range(4):
        j.append(bytes([i]))
    with pytest.raises(JournalFull):
        j.append(b"x")
    for i in range(4):
        j.take_unsent()
    j.confirm_through(3)
    for i in range(4, 8):                     # slots reused
        j.append(bytes([i]))
    assert [j.take_unsent()[1] for _ in range(4)] == [bytes([i]) for i in range(4, 8)]


def test_rewind_reissues_unconfirmed_only():
    j = TxJournal(16, 128)
    for i in range(6):
        j.append(bytes([i]))
    for _ in range(5):
        j.take_unsent()
    j.confirm_through(1)
    assert j.rewind() == 3                    # seq 2, 3, 4 were in the device
    assert [j.take_unsent()[0] for _ in range(4)] == [2, 3, 4, 5]
    assert j.reissued == 3


def test_confirm_of_unsent_is_refused():
    j = TxJournal(8, 128)
    j.append(b"a")
    with pytest.raises(Exception, match="never sent"):
        j.confirm_through(0)


def test_another_mapping_sees_the_same_journal():
    j = TxJournal(8, 256)
    j.append(b"hello")
    j.take_unsent()
    other = TxJournal.attach(os.dup(j.fd), 8, 256)
    assert other.head == 1 and other.sent == 1 and other.tail == 0
    assert other.frame(0) == b"hello"
    other.close()
    j.close()


class _Tap:
    """A TAP's read side with frame boundaries (a SOCK_SEQPACKET pair: one read, one frame)."""

    def __init__(self):
        import socket
        self.host, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        self._ours = ours
        self.fd = ours.fileno()
        self.read_errors = 0

    def read_batch(self, n):
        raise AssertionError("a TAP without a virtio-net header is read straight into the journal")


def test_tap_frames_are_read_straight_into_slots_another_process_maps():
    """What the worker read is in the shared journal when the read returns: a successor that
    maps the same memory sees it, whatever became of the reader."""
    from udrv.admission import TxAdmission
    j = TxJournal(8, 2048)
    other = TxJournal.attach(os.dup(j.fd), 8, 2048)
    adm = TxAdmission(j, lambda: 1500)
    tap = _Tap()
    frames = [bytes([i]) * (60 + i) for i in range(3)]
    for f in frames:
        tap.host.send(f)
    tap.host.send(b"\xee" * 1600)                        # longer than MTU 1500 + 18
    assert adm.pull(tap, 64) == 3
    assert adm.counts.frames_in == 4 and adm.counts.dropped == {"oversize": 1}
    other.sync()
    assert other.unsent() == 3 and [other.frame(s) for s in range(3)] == frames
    assert adm.pull(tap, 64) == 0                        # nothing left: EAGAIN, no error
    assert tap.read_errors == 0


def test_a_full_journal_leaves_the_frame_in_the_tap():
    from udrv.admission import TxAdmission
    j = TxJournal(2, 2048)
    adm = TxAdmission(j, lambda: 1500)
    tap = _Tap()
    for i in range(3):
        tap.host.send(bytes([i]) * 64)
    assert adm.pull(tap, 64) == 2 and j.space() == 0
    with pytest.raises(JournalFull):
        j.read_into(tap.fd, 1518, bytearray(64))
    j.take_unsent()
    j.confirm_through(0)
    assert adm.pull(tap, 64) == 1 and j.frame(2) == bytes([2]) * 64     # the third frame waited in the TAP


def _udp4(n: int, size: int) -> bytes:
    """An Ethernet + IPv4 + UDP frame of `size` bytes (its length is in its own headers)."""
    import struct
    ip_len = size - 14
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, ip_len, n, 0, 64, 17, 0, b"\x0a\x00\x00\x01", b"\x0a\x00\x00\x02")
    udp = struct.pack("!HHHH", 1000, 7779, ip_len - 20, 0)
    return b"\x02\x00\x00\x00\x00\x02" + b"\x02\x00\x00\x00\x00\x01" + b"\x08\x00" + ip + udp + bytes([n & 0xFF]) * (ip_len - 28)


def _reader_killed_after_its_read(j: TxJournal, tap: "_Tap") -> None:
    """A worker that dies the instant a read from the TAP into the journal returns, before it
    can publish the frame (as a SIGKILL pending at the end of the read() syscall kills it)."""
    import signal
    pid = os.fork()
    if pid == 0:
        real = os.readv

        def read_then_die(fd, bufs):
            real(fd, bufs)
            os.kill(os.getpid(), signal.SIGKILL)

        os.readv = read_then_die
        try:
            j.read_into(tap.fd, 1518, bytearray(65536))
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


@pytest.mark.parametrize("size", [60, 1514])
def test_a_frame_read_by_a_worker_killed_before_it_published_it_is_rescued(size):
    from udrv.admission import TxAdmission
    j = TxJournal(8, 2048)
    tap = _Tap()
    tap.host.send(_udp4(1, 100))
    assert TxAdmission(j, lambda: 1500).pull(tap, 1) == 1            # a published frame before
    frame = _udp4(2, size)
    tap.host.send(frame)
    _reader_killed_after_its_read(j, tap)
    successor = TxJournal.attach(os.dup(j.fd), 8, 2048)
    successor.sync()
    assert successor.head == 1                                       # the dead reader never published it
    assert successor.unfinished_read(0) == (True, frame)
    assert successor.unfinished_read(0) == (False, None)             # taken once
    adm = TxAdmission(successor, lambda: 1500)
    assert adm.admit([frame]) == 1 and successor.frame(1) == frame


def test_a_read_that_found_nothing_or_was_published_leaves_nothing_to_rescue():
    from udrv.admission import TxAdmission
    j = TxJournal(8, 2048)
    tap = _Tap()
    adm = TxAdmission(j, lambda: 1500)
    assert adm.pull(tap, 4) == 0                                    # EAGAIN: the mark is set, no frame
    assert TxJournal.attach(os.dup(j.fd), 8, 2048).unfinished_read(0) == (False, None)
    tap.host.send(_udp4(3, 80))
    tap.host.send(b"\x02" * 1600)                                   # oversize: read, dropped
    assert adm.pull(tap, 2) == 1 and adm.counts.dropped == {"oversize": 1}
    assert TxJournal.attach(os.dup(j.fd), 8, 2048).unfinished_read(0) == (False, None)


def test_a_rescued_frame_whose_length_its_headers_do_not_tell_is_reported_lost():
    j = TxJournal(8, 2048)
    tap = _Tap()
    tap.host.send(b"\x02\x00\x00\x00\x00\x02" + b"\x02\x00\x00\x00\x00\x01" + b"\x88\xb5" + bytes(46))
    _reader_killed_after_its_read(j, tap)
    assert TxJournal.attach(os.dup(j.fd), 8, 2048).unfinished_read(0) == (True, None)
