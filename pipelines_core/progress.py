"""How long work reports progress: a plain callable, so the engine never imports ComfyUI.

`progress(done, total)` is called after each unit of work (a denoising step, a decoded chunk).
It may raise to stop the work: inside ComfyUI the node passes a callable that updates ComfyUI's
progress bar, which raises ComfyUI's interrupt exception when the user pressed Cancel.
"""

from __future__ import annotations

from typing import Callable, Optional

Progress = Callable[[int, int], None]


def no_progress(done: int, total: int) -> None:
    return None


def tqdm_progress(desc: str) -> Progress:
    """A headless progress bar (tqdm), created lazily on the first call."""
    from tqdm.auto import tqdm

    bar: list = []

    def update(done: int, total: int) -> None:
        if not bar:
            bar.append(tqdm(total=total, desc=desc, leave=False))
        b = bar[0]
        if b.total != total:
            b.total = total
        b.n = done
        b.refresh()
        if done >= total:
            b.close()

    return update


def or_silent(progress: Optional[Progress]) -> Progress:
    return progress if progress is not None else no_progress
