"""Size-capped rotating logs for a replica's stdout and stderr.

``service.log`` takes output until it holds ``max_bytes``; then it becomes ``service.log.1``
(which becomes ``.2``, and so on), and the oldest beyond ``files`` is deleted. A replica's logs
therefore never take more than ``max_bytes * files`` on disk, however much it prints.
Writes are small and synchronous (a pump hands over at most one pipe read at a time).
"""

from __future__ import annotations

import os
from pathlib import Path

from p2pdeploy.fabric.executor import LogPolicy

LOG_NAME = "service.log"


class RotatingLog:
    def __init__(self, directory: str | os.PathLike[str], policy: LogPolicy, name: str = LOG_NAME) -> None:
        self.directory = Path(directory)
        self.policy = policy
        self.name = name
        self.directory.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = None
        self._size = 0
        self._open()

    def path(self, index: int = 0) -> Path:
        return self.directory / (self.name if index == 0 else f"{self.name}.{index}")

    def _open(self) -> None:
        path = self.path()
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        self._size = os.fstat(self._fd).st_size

    def write(self, data: bytes) -> None:
        if self._fd is None:
            return
        view = memoryview(data)
        while view:
            room = self.policy.max_bytes - self._size
            if room <= 0:
                self._rotate()
                continue
            chunk = view[:room]
            written = os.write(self._fd, chunk)
            self._size += written
            view = view[written:]

    def _rotate(self) -> None:
        assert self._fd is not None
        os.close(self._fd)
        self._fd = None
        files = self.policy.files
        if files == 1:
            os.unlink(self.path())
        else:
            oldest = self.path(files - 1)
            if oldest.exists():
                oldest.unlink()
            for index in range(files - 2, -1, -1):
                source = self.path(index)
                if source.exists():
                    source.rename(self.path(index + 1))
        self._open()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files())

    def files(self) -> list[Path]:
        """The log files, newest first."""
        return [p for p in (self.path(i) for i in range(self.policy.files)) if p.exists()]


def read_tail(directory: str | os.PathLike[str], max_bytes: int, files: int = 100, name: str = LOG_NAME) -> bytes:
    """The last ``max_bytes`` of a replica's logs across its rotated files, oldest first."""
    base = Path(directory)
    chunks: list[bytes] = []
    remaining = max_bytes
    for index in range(files):
        if remaining <= 0:
            break
        path = base / (name if index == 0 else f"{name}.{index}")
        try:
            with path.open("rb") as file:
                size = file.seek(0, os.SEEK_END)
                start = max(0, size - remaining)
                file.seek(start)
                chunk = file.read(size - start)
        except FileNotFoundError:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(reversed(chunks))
