"""A synthetic movie-rating world with known ground truth.

Why: the ThinkRec pipeline needs data where *all three* signals are learnable, so that the demo, the
embedded default config and the tests can check that each stage learns something:

- **text**: every title is built from genre-specific words ("Galaxy Robot" is sci-fi) and the
  description names the genres, so an LLM reading history titles can infer the user's taste;
- **collaborative signal**: a hidden low-rank term (user/item latent factors) and an item quality
  bias that no text reveals, so CF embeddings add information on top of the titles;
- **reasons**: `template_reason` writes "Yes. because the user liked several sci-fi movies ..." from
  the same genre facts that drive the ratings, so the reasons are true of the data.

Generative story (all draws from one `numpy.random.Generator(seed)`):

    affinity[u, g]  = +1.5 for 2 loved genres, -1.5 for 1 hated genre, N(0, 0.3) otherwise; with
                      n_personas > 0 (default 4) every user takes the loved/hated genres of a random
                      persona, so there are planted user groups (truth["persona"])
    genres(i)       = 1 or 2 genres; quality[i] ~ N(0, 0.3)
    latent          = U[u] . V[i], a unit-variance low-rank term scaled to std 0.8 * latent_scale
    leniency[u]     ~ N(0, user_bias) (default user_bias=0: none): how generously a user rates, the
                      per-user baseline of real rating data; it shows in the labels of a user's history
    true_score[u,i] = mean_{g in genres(i)} affinity[u, g] + latent + quality[i] + leniency[u]
    rating          = clip(round(3.2 + 1.2 * (true_score + N(0, noise))), 1, 5)

Which items a user rates: Gumbel-top-n over logits 0.5*log(popularity) + 0.7*genre affinity (users
mostly pick what they like, but not only). Timestamps: each user starts at a random time in the first
60% of a one-year span and rates uniformly after that, so a global chronological split leaves most
test users with a history.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from distthink.errors import ConfigError
from distthink.tasks.thinkrec.interactions import Interactions
from distthink.tasks.thinkrec.prepare import prepare

GENRE_WORDS: dict[str, tuple[str, ...]] = {
    "sci-fi": ("Galaxy", "Robot", "Orbit", "Starship", "Android", "Nebula", "Quantum", "Cosmos"),
    "comedy": ("Laugh", "Prank", "Silly", "Wacky", "Banana", "Giggle", "Oddball", "Jester"),
    "drama": ("Tears", "Promise", "Silence", "Letters", "Winter", "Mother", "Journey", "Legacy"),
    "horror": ("Haunted", "Crypt", "Shadow", "Scream", "Blood", "Ghoul", "Curse", "Coffin"),
    "romance": ("Love", "Kiss", "Heart", "Wedding", "Valentine", "Sweetheart", "Darling", "Embrace"),
    "documentary": ("Planet", "History", "Ocean", "Wildlife", "Inside", "Truth", "Archive", "Expedition"),
    "animation": ("Cartoon", "Bunny", "Toy", "Dragon", "Pixel", "Puppy", "Bubble", "Kitten"),
    "thriller": ("Conspiracy", "Hostage", "Pursuit", "Deadline", "Cipher", "Trap", "Escape", "Witness"),
    "western": ("Saloon", "Outlaw", "Sheriff", "Canyon", "Frontier", "Rodeo", "Cowboy", "Stagecoach"),
    "fantasy": ("Wizard", "Elf", "Kingdom", "Sword", "Sorcerer", "Unicorn", "Quest", "Enchanted"),
}
GENRES = tuple(GENRE_WORDS)
_T0 = 1_577_836_800  # 2020-01-01T00:00:00Z
_SPAN = 365 * 24 * 3600


@dataclass
class SyntheticData:
    """interactions: the generic `Interactions` form (raw ids "u00012", "i00345").

    truth: ground truth arrays, indexed by the integer part of the raw ids:
        affinity (n_users, n_genres), user_latent (n_users, dim), item_latent (n_items, dim),
        item_genres (n_items, 2) genre indices (-1 = none), quality (n_items,), genres (names),
        true_score (n_rows,) aligned with interactions.ratings rows.
    """

    interactions: Interactions
    truth: dict

    def write(self, out_dir: str | Path, fmt: str = "csv") -> dict[str, Path]:
        """Write interactions.{csv|parquet}, items.{csv|parquet}, truth.npz and truth.json."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if fmt not in ("csv", "parquet"):
            raise ValueError(f"fmt must be csv or parquet, got {fmt!r}")
        paths = {"interactions": out / f"interactions.{fmt}", "items": out / f"items.{fmt}"}
        for key, df in (("interactions", self.interactions.ratings), ("items", self.interactions.items)):
            if fmt == "csv":
                df.to_csv(paths[key], index=False)
            else:
                df.to_parquet(paths[key], index=False)
        arrays = {k: v for k, v in self.truth.items() if isinstance(v, np.ndarray)}
        np.savez(out / "truth.npz", **arrays)
        aff = self.truth["affinity"]
        summary = {
            "genres": list(GENRES),
            "users": {f"u{u:05d}": {"loved": [GENRES[g] for g in np.flatnonzero(aff[u] >= 1.0)],
                                    "hated": [GENRES[g] for g in np.flatnonzero(aff[u] <= -1.0)],
                                    "persona": int(self.truth["persona"][u])}
                      for u in range(aff.shape[0])},
            "config": self.truth["config"],
        }
        (out / "truth.json").write_text(json.dumps(summary, indent=1))
        paths["truth"] = out / "truth.npz"
        return paths


def generate(n_users: int = 300, n_items: int = 200, *, min_per_user: int = 20, max_per_user: int = 60,
             dim: int = 8, latent_scale: float = 1.0, noise: float = 0.4, n_personas: int = 4,
             user_bias: float = 0.0, seed: int = 0) -> SyntheticData:
    """Draw a synthetic world. Deterministic for a given (sizes, seed). See the module docstring."""
    if not 1 <= min_per_user <= max_per_user <= n_items:
        raise ConfigError(f"synthetic sizes: need 1 <= min_per_user ({min_per_user}) <= max_per_user "
                          f"({max_per_user}) <= n_items ({n_items})")
    rng = np.random.default_rng(seed)
    n_genres = len(GENRES)

    # --- users: 2 loved genres, 1 hated genre, mild noise elsewhere. With personas, users share the
    # loved/hated genres of their persona (planted user groups for the mixture-of-LoRA stage).
    rows = np.arange(n_users)
    if n_personas > 0:
        persona_order = np.argsort(rng.random((n_personas, n_genres)), axis=1)
        persona = rng.integers(0, n_personas, n_users)
        order = persona_order[persona]
    else:
        persona = np.full(n_users, -1)
        order = np.argsort(rng.random((n_users, n_genres)), axis=1)  # a random permutation per user
    affinity = rng.normal(0.0, 0.3, size=(n_users, n_genres))
    affinity[rows, order[:, 0]] = 1.5
    affinity[rows, order[:, 1]] = 1.5
    affinity[rows, order[:, 2]] = -1.5

    # --- items: 1-2 genres, a title from the genres' words, a quality bias
    g1 = rng.integers(0, n_genres, n_items)
    two = rng.random(n_items) < 0.4
    g2 = np.where(two, (g1 + rng.integers(1, n_genres, n_items)) % n_genres, -1)
    item_genres = np.stack([g1, g2], axis=1)
    quality = rng.normal(0.0, 0.3, n_items)
    titles, descriptions, genre_str = _titles(item_genres, rng)

    # --- hidden collaborative term
    # each factor ~ N(0, dim^-1/4) so that U[u].V[i] has unit variance; scaled to std 0.8*latent_scale
    user_latent = rng.normal(0.0, dim ** -0.25, (n_users, dim)) * (0.8 * latent_scale)
    item_latent = rng.normal(0.0, dim ** -0.25, (n_items, dim))

    # genre match of every (user, item): mean affinity over the item's genres
    has2 = item_genres[:, 1] >= 0
    match = affinity[:, item_genres[:, 0]]
    match = np.where(has2[None, :], 0.5 * (match + affinity[:, np.maximum(item_genres[:, 1], 0)]), match)

    # --- exposure: Gumbel top-n without replacement, vectorised over all users
    popularity = rng.zipf(1.6, n_items).clip(max=1000).astype(float)
    logits = 0.5 * np.log(popularity)[None, :] + 0.7 * match
    gumbel = -np.log(-np.log(rng.random((n_users, n_items)).clip(1e-12, 1 - 1e-12)))
    ranked = np.argsort(-(logits + gumbel), axis=1)
    counts = rng.integers(min_per_user, max_per_user + 1, n_users)
    mask = np.arange(n_items)[None, :] < counts[:, None]
    user_idx = np.repeat(rows[:, None], n_items, axis=1)[mask]
    item_idx = ranked[mask]

    true_score = match[user_idx, item_idx] + np.einsum("nd,nd->n", user_latent[user_idx],
                                                        item_latent[item_idx]) + quality[item_idx]
    leniency = rng.normal(0.0, user_bias, n_users) if user_bias > 0 else np.zeros(n_users)
    true_score = true_score + leniency[user_idx]
    rating = np.clip(np.rint(3.2 + 1.2 * (true_score + rng.normal(0.0, noise, len(user_idx)))), 1, 5)

    start = _T0 + (rng.random(n_users) * 0.6 * _SPAN).astype(np.int64)
    ts = start[user_idx] + (rng.random(len(user_idx)) * (_T0 + _SPAN - start[user_idx])).astype(np.int64)

    ratings = pd.DataFrame({
        "user_id": np.array([f"u{u:05d}" for u in user_idx], dtype=object),
        "item_id": np.array([f"i{i:05d}" for i in item_idx], dtype=object),
        "rating": rating.astype(np.float64),
        "timestamp": ts.astype(np.int64),
    })
    items = pd.DataFrame({"item_id": np.array([f"i{i:05d}" for i in range(n_items)], dtype=object),
                          "title": titles, "description": descriptions, "genres": genre_str})
    truth = {"affinity": affinity, "leniency": leniency, "user_latent": user_latent, "item_latent": item_latent,
             "item_genres": item_genres, "quality": quality, "true_score": true_score, "persona": persona,
             "genres": np.array(GENRES),
             "config": {"n_users": n_users, "n_items": n_items, "min_per_user": min_per_user,
                        "max_per_user": max_per_user, "dim": dim, "latent_scale": latent_scale,
                        "noise": noise, "n_personas": n_personas, "user_bias": user_bias, "seed": seed}}
    return SyntheticData(Interactions(ratings, items, source=f"synthetic:seed={seed}"), truth)


def _titles(item_genres: np.ndarray, rng: np.random.Generator) -> tuple[list[str], list[str], list[str]]:
    """Titles from genre words ("Galaxy Kiss (2003)"), unique by construction via the year/sequel."""
    seen: set[str] = set()
    titles, descs, gstr = [], [], []
    for g1, g2 in item_genres:
        w1 = GENRE_WORDS[GENRES[g1]][rng.integers(0, 8)]
        w2 = GENRE_WORDS[GENRES[g2 if g2 >= 0 else g1]][rng.integers(0, 8)]
        base = f"{w1} {w2}" if w1 != w2 else f"The {w1}"
        year = int(rng.integers(1960, 2020))
        title, n = f"{base} ({year})", 2
        while title in seen:
            title, n = f"{base} {_roman(n)} ({year})", n + 1
        seen.add(title)
        names = [GENRES[g1]] + ([GENRES[g2]] if g2 >= 0 else [])
        titles.append(title)
        descs.append(f"A {' / '.join(names)} movie.")
        gstr.append("|".join(names))
    return titles, descs, gstr


def _roman(n: int) -> str:
    return {2: "II", 3: "III", 4: "IV", 5: "V"}.get(n, str(n))


def prepare_synthetic(out_dir: str | Path, *, history_len: int = 10, reasons: str = "template",
                      fmt: str = "parquet", **generate_kwargs) -> dict:
    """generate(**generate_kwargs) + prepare(...) in one call (demo, embedded default, other tests).

    Returns prepare's meta dict; the folder is ready for `distthink rec train-cf --data out_dir`.
    """
    data = generate(**generate_kwargs)
    return prepare(data.interactions, out_dir, history_len=history_len, reasons=reasons, fmt=fmt)
