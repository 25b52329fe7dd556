"""How the real executor measures a replica's files against its disk reservation."""

import os

from p2pdeploy.runtime.executor import files_size

MIB = 1024 * 1024


def test_files_size_counts_allocated_blocks_each_inode_once_and_follows_no_link(tmp_path):
    inside = tmp_path / "replica"
    (inside / "deep" / "er").mkdir(parents=True)
    (inside / "deep" / "er" / "data").write_bytes(b"x" * MIB)
    os.link(inside / "deep" / "er" / "data", inside / "again")  # the same blocks, counted once
    with open(inside / "sparse", "wb") as sparse:
        sparse.truncate(64 * MIB)  # takes (almost) nothing
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "big").write_bytes(b"y" * 4 * MIB)
    (inside / "link").symlink_to(outside, target_is_directory=True)
    (inside / "file-link").symlink_to(outside / "big")

    used, complete = files_size([inside], max_entries=1000)
    assert complete
    assert MIB <= used < MIB + 64 * 1024


def test_files_size_stops_after_its_entries_and_says_it_did(tmp_path):
    for index in range(50):
        (tmp_path / f"empty-{index}").touch()
    assert files_size([tmp_path], max_entries=50) == (0, True)
    assert files_size([tmp_path], max_entries=49) == (0, False)


def test_files_size_of_what_is_not_there_is_nothing(tmp_path):
    assert files_size([tmp_path / "gone"], max_entries=10) == (0, True)
