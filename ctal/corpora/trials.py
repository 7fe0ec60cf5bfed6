"""Speaker-verification trials as VoxCeleb lists them, (label, a, b): label 1 for the same speaker
(target), 0 for different (non-target).

`make_trials` puts utterance ids (the Parquet `id`) where VoxCeleb's lists hold relative wav paths:
the evaluation looks embeddings up by id.
"""

from __future__ import annotations

import random
from collections import defaultdict

Trial = tuple[int, str, str]


def make_trials(rows, n_pairs: int, seed: int) -> list[Trial]:
    """`n_pairs` distinct trials over `rows` (manifest rows of held-out speakers): n_pairs // 2 target
    pairs and the rest non-target, each drawn uniformly from all such pairs, shuffled. Depends only on
    the set of (id, speaker) and the seed, not on row order."""
    by_speaker = defaultdict(list)
    for r in rows:
        by_speaker[r["speaker"]].append(r["id"])
    groups = [sorted(by_speaker[s]) for s in sorted(by_speaker)]
    speaker_of = {u: i for i, g in enumerate(groups) for u in g}
    ids = sorted(speaker_of)
    if len(ids) != sum(map(len, groups)):
        raise ValueError("utterance ids repeat in the rows given to make_trials")
    n_target = n_pairs // 2
    target_weights = [len(g) * (len(g) - 1) // 2 for g in groups]
    available = (sum(target_weights), len(ids) * (len(ids) - 1) // 2 - sum(target_weights))
    if n_target > available[0] or n_pairs - n_target > available[1]:
        raise ValueError(f"{n_pairs} balanced trials need {n_target} target and {n_pairs - n_target} non-target "
                         f"pairs; {len(ids)} utterances of {len(groups)} speakers offer {available[0]} and {available[1]}")
    rng = random.Random(seed)

    def draw(count, total, all_pairs, one_pair):
        if count > total // 2:  # dense request: enumerate, then sample
            return rng.sample(sorted(all_pairs()), count)
        chosen = set()
        while len(chosen) < count:  # sparse request: rejection sampling never enumerates O(N^2) pairs
            chosen.add(one_pair())
        return sorted(chosen)

    def one_target():
        g = rng.choices(groups, weights=target_weights)[0]
        return tuple(sorted(rng.sample(g, 2)))

    def one_non_target():
        while True:
            a, b = rng.sample(ids, 2)
            if speaker_of[a] != speaker_of[b]:
                return tuple(sorted((a, b)))

    targets = draw(n_target, available[0], lambda: [(a, b) for g in groups for i, a in enumerate(g) for b in g[i + 1:]],
                   one_target)
    non_targets = draw(n_pairs - n_target, available[1],
                       lambda: [(a, b) for i, a in enumerate(ids) for b in ids[i + 1:] if speaker_of[a] != speaker_of[b]],
                       one_non_target)
    trials = [(1, a, b) for a, b in targets] + [(0, a, b) for a, b in non_targets]
    rng.shuffle(trials)
    return trials
