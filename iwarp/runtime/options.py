"""The engine settings that every command which animates takes (`serve`, `animate`, `cam`,
`bench`), declared once and nested in each command's options (`iwarp.options`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from iwarp.options import option

if TYPE_CHECKING:
    from iwarp.runtime.animator import Animator


@dataclass
class EngineOptions:
    """Which engine animates, with which weights, on how many CPU threads."""

    backend: str = option(
        "auto",
        help="auto, torch, onnxruntime, openvino or tensorrt (auto: the fastest engine here "
        "that passes its accuracy gate); iwarp bench also takes NAME:PRECISION "
        "(openvino:bf16), several comma-separated, and 'all'",
    )
    checkpoint: str | None = option(None, help="weights (default: the ones shipped in the package)")
    threads: int = option(
        0, help="CPU threads per frame (0: all physical cores; iwarp serve: shared by its workers)"
    )

    def animator(self, **kwargs: Any) -> Animator:
        """An `Animator` on this engine (`Animator.from_pretrained`'s other arguments)."""
        from iwarp.runtime.animator import Animator

        return Animator.from_pretrained(
            self.backend, self.checkpoint, threads=self.threads, **kwargs
        )


def avatar_photos(flag: str) -> Any:
    """The avatar's photos, as a repeatable option `flag` (one photo each time)."""
    return option(
        default_factory=list,
        flag=flag,
        metavar="PHOTO",
        help="avatar photo, repeatable: several photos of one face (default: a packaged portrait)",
    )
