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
