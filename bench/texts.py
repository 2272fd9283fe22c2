"""The benchmark's text inputs (`--modality text`): deterministic, caption-like sentences.

Lengths vary as captions and search queries do, from a few words to a paragraph; about one
text in 40 runs past a CLIP model's 77 tokens, so truncation is part of the load. The words
come from a small English vocabulary, so the tokenizer's per-word cache warms as it would on
real captions; a running number keeps every text different.
"""

from __future__ import annotations

import random
import statistics

_SUBJECTS = ("a cat", "two dogs", "an old man", "a young woman", "a red car", "a small boat",
             "a group of children", "a brown horse", "a yellow bus", "a bowl of soup",
             "a wooden chair", "a tall building", "a flock of birds", "a bicycle",
             "a cup of coffee", "a street musician", "a snowy mountain", "a green parrot")
_VERBS = ("sitting on", "standing next to", "running across", "parked beside", "floating on",
          "resting under", "looking at", "walking along", "lying near", "hanging above")
_PLACES = ("a kitchen table", "the beach", "a busy street", "a quiet lake", "an open field",
           "a wooden bridge", "the city square", "a dark forest", "a crowded market",
           "the train station", "a garden full of flowers", "a stone wall")
_DETAILS = ("in the morning light", "on a rainy afternoon", "at sunset", "in black and white",
            "with trees in the background", "seen from above", "in a blurry photo",
            "under a cloudy sky", "with people walking by", "in winter", "close up",
            "during a festival", "next to a red umbrella", "with a mountain behind")


def caption(rng: random.Random, number: int) -> str:
    """One sentence: a subject, what it does and where, then 0 to 8 details (rarely 15)."""
    details = rng.sample(_DETAILS, rng.choice((0, 1, 1, 2, 2, 3, 4, 8)))
    if rng.random() < 0.025:  # long enough to be truncated at 77 tokens
        details = rng.sample(_DETAILS, 14) + rng.sample(_DETAILS, 6)
    words = [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_PLACES), *details]
    return f"photo {number}: " + " ".join(words) + "."


def make_texts(count: int, seed: int = 5) -> list[str]:
    rng = random.Random(seed)
    return [caption(rng, i) for i in range(count)]


def texts_summary(texts: list[str]) -> dict[str, object]:
    words = [len(text.split()) for text in texts]
    return {"count": len(texts), "mean_words": round(statistics.fmean(words), 1),
            "min_words": min(words), "max_words": max(words)}
