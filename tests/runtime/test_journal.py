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
