"""Avatars on disk: each one a folder with its photos and a meta.json, written atomically.

    <root>/<avatar_id>/source_0.png, source_1.png, ..., meta.json

A folder appears under its final name only when complete (written under a temporary name,
then renamed), so a crash never leaves half an avatar that a restart would trip over; the
temporary folders a crash leaves (photos of an upload that never finished) are deleted when
the store is opened.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from iwarp.errors import InputError
from iwarp.media import read_image


def _running(pid: int) -> bool:
    """Whether process `pid` exists (another server may be writing to the same store)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class AvatarRecord:
    avatar_id: str
    num_sources: int
    owner: str = ""
    name: str = ""
    created: float = field(default_factory=time.time)


class AvatarStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        for leftover in self.root.glob(".tmp-*"):
            writer = leftover.name.rsplit("-", 1)[-1]  # .tmp-<id>-<pid of the writer>
            if not (writer.isdigit() and _running(int(writer))):
                shutil.rmtree(leftover, ignore_errors=True)

    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex[:12]

    def save(self, record: AvatarRecord, photos: list[np.ndarray]) -> Path:
        final = self.root / record.avatar_id
        tmp = self.root / f".tmp-{record.avatar_id}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for i, photo in enumerate(photos):
            Image.fromarray(photo).save(tmp / f"source_{i}.png")
        (tmp / "meta.json").write_text(json.dumps(asdict(record), indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        return final

    def load(self, avatar_id: str) -> tuple[AvatarRecord, list[np.ndarray]]:
        folder = self.root / avatar_id
        meta = folder / "meta.json"
        if not meta.is_file():
            raise InputError(f"unknown avatar {avatar_id!r}", "list avatars or add a new one")
        record = AvatarRecord(**json.loads(meta.read_text()))
        photos = [read_image(folder / f"source_{i}.png") for i in range(record.num_sources)]
        return record, photos

    def delete(self, avatar_id: str) -> None:
        shutil.rmtree(self.root / avatar_id, ignore_errors=True)

    def ids(self) -> list[str]:
        return sorted(
            p.name
            for p in self.root.iterdir()
            if p.is_dir() and not p.name.startswith(".") and (p / "meta.json").is_file()
        )

    def load_all(self) -> list[tuple[AvatarRecord, list[np.ndarray]]]:
        """Every complete avatar; a damaged one is skipped with a warning, never fatal."""
        out = []
        for avatar_id in self.ids():
            try:
                out.append(self.load(avatar_id))
            except (InputError, OSError, ValueError, TypeError) as exc:
                warnings.warn(f"skipping stored avatar {avatar_id}: {exc}", stacklevel=2)
        return out
