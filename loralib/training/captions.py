"""Captions that change from step to step: shuffled tags, dropped tags (sd-scripts' semantics).

A caption is read as comma-separated tags. The first ``keep_tokens`` tags (a trigger word, a
class) stay first and are never dropped; the others are shuffled (``shuffle_caption``) and each is
left out with probability ``caption_tag_dropout``; the result is joined with ``", "``.
"""

from __future__ import annotations

import random


def process_caption(caption: str, rng: random.Random, *, shuffle: bool, keep_tokens: int,
                    tag_dropout: float) -> str:
    """The caption as one step sees it; ``rng`` makes every random choice."""
    tags = [tag.strip() for tag in caption.split(",") if tag.strip()]
    fixed, free = tags[:keep_tokens], tags[keep_tokens:]
    if shuffle:
        rng.shuffle(free)
    if tag_dropout > 0:
        free = [tag for tag in free if rng.random() >= tag_dropout]
    return ", ".join(fixed + free)
