"""Blind votes between probe answers, and the ratings they give each checkpoint.

A contestant is a (run id, step): the answers a run gave at that step (step 0: the base model). The
page shows two answers to the same prompt as A and B, origins hidden, and stores the user's vote
(``RunStore.add_vote``). ``ratings`` fits a Bradley-Terry model to all votes -- the chance that x
beats y is s_x / (s_x + s_y) -- so a checkpoint's rating uses every comparison it took part in, in
any order (Elo would depend on the order of the votes).
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from itertools import combinations

Contestant = tuple[str, int]  # (run id, step)
BASE_RATING = 1000.0  # an answer as good as the virtual average one (and every one before a vote)
_SCORE = {"a": 1.0, "b": 0.0, "tie": 0.5}


def ratings(votes: list[dict]) -> dict[Contestant, float]:
    """Each voted contestant's Bradley-Terry strength on the Elo scale (1000 + 400 log10 s).

    Every contestant also plays one virtual tie against an average answer (strength 1): a one-sided
    record then gets a finite rating, and a rating from a few votes stays near 1000. The strengths are
    fitted by the minorization-maximization iteration (Hunter 2004), which converges from any start.
    """
    wins: dict[Contestant, float] = defaultdict(float)
    games: dict[Contestant, dict[Contestant, float]] = defaultdict(lambda: defaultdict(float))
    for vote in votes:
        a, b = (vote["a_run"], vote["a_step"]), (vote["b_run"], vote["b_step"])
        wins[a] += _SCORE[vote["winner"]]
        wins[b] += 1 - _SCORE[vote["winner"]]
        games[a][b] += 1
        games[b][a] += 1
    strength = {c: 1.0 for c in games}
    for _ in range(500):
        new = {c: (wins[c] + 0.5) / (sum(n / (strength[c] + strength[o]) for o, n in games[c].items())
                                     + 1 / (strength[c] + 1)) for c in strength}
        done = max((abs(math.log(new[c] / strength[c])) for c in strength), default=0.0) < 1e-9
        strength = new
        if done:
            break
    return {c: BASE_RATING + 400 * math.log10(s) for c, s in strength.items()}


def next_pair(answers: list[dict], votes: list[dict], rng: random.Random | None = None) -> dict | None:
    """Two different answers to one prompt, from two contestants, for a blind vote: the pair voted on
    least so far (ties drawn at random), in a random order. ``answers``: the store's probe answers.
    Returns {"prompt", "a": (run, step), "b": (run, step), "a_answer", "b_answer"}, or None when no two
    answers differ."""
    rng = rng or random.Random()
    by_prompt: dict[str, dict[Contestant, str]] = defaultdict(dict)
    for answer in answers:
        by_prompt[answer["prompt"]][(answer["run_id"], answer["step"])] = answer["answer"]
    voted: dict[tuple, int] = defaultdict(int)
    for vote in votes:
        pair = frozenset([(vote["a_run"], vote["a_step"]), (vote["b_run"], vote["b_step"])])
        voted[(vote["prompt"], pair)] += 1
    candidates = [(prompt, x, y) for prompt, said in by_prompt.items()
                  for x, y in combinations(sorted(said), 2) if said[x].strip() != said[y].strip()]
    if not candidates:
        return None
    fewest = min(voted[(p, frozenset([x, y]))] for p, x, y in candidates)
    prompt, x, y = rng.choice([c for c in candidates if voted[(c[0], frozenset(c[1:]))] == fewest])
    if rng.random() < 0.5:
        x, y = y, x
    return {"prompt": prompt, "a": x, "b": y, "a_answer": by_prompt[prompt][x], "b_answer": by_prompt[prompt][y]}
