"""Loaders: tiny files of every supported format, well-formed and malformed."""

import json
import pickle

import numpy as np
import pandas as pd
import pytest

from distthink.errors import DataError
from distthink.tasks.thinkrec.interactions import load_interactions
from distthink.tasks.thinkrec.prompts import template_reason
from distthink.tasks.thinkrec.synthetic_world import GENRES, generate


def _ml(tmp_path, ratings, movies):
    (tmp_path / "ratings.dat").write_bytes(ratings.encode("latin-1"))
    (tmp_path / "movies.dat").write_bytes(movies.encode("latin-1"))
    return tmp_path


def test_movielens_loads_latin1(tmp_path):
    root = _ml(tmp_path, "1::10::5::978300760\n1::20::3::978302109\n2::10::4::978301968\n",
               "10::Amélie (2001)::Comedy|Romance\n20::Toy Story (1995)::Animation|Children's\n")
    d = load_interactions(root, "movielens")
    assert d.ratings.shape == (3, 4)
    assert d.ratings["rating"].tolist() == [5.0, 3.0, 4.0]
    assert d.ratings["timestamp"].dtype == np.int64
    items = d.items.set_index("item_id")
    assert items.loc["10", "title"] == "Amélie (2001)" and items.loc["10", "genres"] == "Comedy|Romance"


def test_movielens_errors_name_file_line_field(tmp_path):
    root = _ml(tmp_path, "1::10::5::978300760\n1::20::five::978302109\n", "10::A (2001)::Comedy\n")
    with pytest.raises(DataError) as err:
        load_interactions(root, "movielens")
    assert err.value.line == 2 and err.value.field == "Rating" and "ratings.dat" in str(err.value)
    root2 = tmp_path / "b"
    root2.mkdir()
    _ml(root2, "1::10::5\n", "10::A::Comedy\n")
    with pytest.raises(DataError, match="expected 4"):
        load_interactions(root2, "movielens")
    with pytest.raises(DataError, match="ratings.dat not found"):
        load_interactions(tmp_path / "nowhere", "movielens")


def test_amazon_both_schemas_and_meta(tmp_path):
    rev = tmp_path / "reviews.jsonl"
    rev.write_text("\n".join([
        json.dumps({"reviewerID": "A1", "asin": "B1", "overall": 5.0, "unixReviewTime": 1400000000}),
        json.dumps({"user_id": "A2", "parent_asin": "B2", "rating": 2.0, "timestamp": 1600000000123}),
        "",
    ]))
    meta = tmp_path / "meta.jsonl"
    meta.write_text(json.dumps({"parent_asin": "B2", "title": "Cable", "description": ["long", "cable"],
                                "categories": ["Electronics", "Cables"]}) + "\n")
    d = load_interactions(rev, "amazon", items=meta)
    assert d.ratings["timestamp"].tolist() == [1400000000, 1600000000]  # ms -> s
    items = d.items.set_index("item_id")
    assert items.loc["B2", "title"] == "Cable" and items.loc["B2", "description"] == "long|cable"
    assert items.loc["B1", "title"] == ""  # no metadata: empty title, reported in the log
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"reviewerID": "A1", "asin": "B1", "overall": 5, "unixReviewTime": 1}) + "\n{oops\n")
    with pytest.raises(DataError) as err:
        load_interactions(bad, "amazon")
    assert err.value.line == 2 and "invalid JSON" in str(err.value)
    miss = tmp_path / "miss.jsonl"
    miss.write_text(json.dumps({"reviewerID": "A1", "overall": 5, "unixReviewTime": 1}) + "\n")
    with pytest.raises(DataError) as err:
        load_interactions(miss, "amazon")
    assert err.value.field == "asin | parent_asin" and err.value.line == 1


def test_yelp_dates_and_business(tmp_path):
    rev = tmp_path / "review.json"
    rev.write_text(json.dumps({"user_id": "u", "business_id": "b", "stars": 4, "date": "2016-03-09 00:00:00"}) + "\n")
    bus = tmp_path / "business.json"
    bus.write_text(json.dumps({"business_id": "b", "name": "Cafe", "categories": "Food, Coffee", "city": "Oslo"}) + "\n")
    d = load_interactions(rev, "yelp", items=bus)
    assert d.ratings["timestamp"].iloc[0] == 1457481600
    assert d.items.iloc[0][["title", "genres", "description"]].tolist() == ["Cafe", "Food|Coffee", "Oslo"]
    rev.write_text(rev.read_text() + json.dumps({"user_id": "u", "business_id": "b", "stars": 4, "date": "yesterday"}) + "\n")
    with pytest.raises(DataError) as err:
        load_interactions(rev, "yelp")
    assert err.value.line == 2 and err.value.field == "date"


def test_generic_csv_parquet_and_errors(tmp_path):
    df = pd.DataFrame({"user_id": ["a", "b"], "item_id": ["x", "y"], "rating": [5, 1], "timestamp": [10, 20]})
    df.to_csv(tmp_path / "r.csv", index=False)
    df.to_parquet(tmp_path / "r.parquet", index=False)
    pd.DataFrame({"item_id": ["x", "y"], "title": ["X", "Y"]}).to_csv(tmp_path / "items.csv", index=False)
    a = load_interactions(tmp_path / "r.csv", "generic", items=tmp_path / "items.csv")
    b = load_interactions(tmp_path / "r.parquet", "generic")
    pd.testing.assert_frame_equal(a.ratings, b.ratings)
    assert a.items["title"].tolist() == ["X", "Y"]
    (tmp_path / "bad.csv").write_text("user_id,item_id,rating,timestamp\na,x,5,10\nb,y,good,20\n")
    with pytest.raises(DataError) as err:
        load_interactions(tmp_path / "bad.csv", "generic")
    assert (err.value.line, err.value.field) == (3, "rating")  # the editor's line number
    (tmp_path / "cols.csv").write_text("user,item,rating,timestamp\na,x,5,10\n")
    with pytest.raises(DataError, match="missing column"):
        load_interactions(tmp_path / "cols.csv", "generic")
    with pytest.raises(DataError, match="unknown format"):
        load_interactions(tmp_path / "r.csv", "netflix")


def test_pickle_needs_trust(tmp_path):
    df = pd.DataFrame({"uid": [1, 2], "iid": [3, 4], "label": [1, 0], "timestamp": [5, 6], "title": ["A", "B"]})
    path = tmp_path / "train.pkl"
    with open(path, "wb") as f:
        pickle.dump(df, f)
    with pytest.raises(DataError, match="arbitrary code"):
        load_interactions(path, "pickle")
    d = load_interactions(path, "pickle", trust_pickle=True)
    assert d.ratings["rating"].tolist() == [1.0, 0.0] and d.items["title"].tolist() == ["A", "B"]


def test_synthetic_is_deterministic_and_learnable(tmp_path):
    a, b = generate(60, 50, min_per_user=15, max_per_user=40, seed=3), generate(60, 50, min_per_user=15, max_per_user=40, seed=3)
    pd.testing.assert_frame_equal(a.interactions.ratings, b.interactions.ratings)
    assert not generate(60, 50, min_per_user=15, max_per_user=40, seed=4).interactions.ratings.equals(a.interactions.ratings)
    r = a.interactions.ratings
    assert r.groupby("user_id").size().between(15, 40).all()
    assert a.interactions.items["title"].is_unique
    # ground truth explains the labels; the genre part alone (what titles reveal) does too, less well
    from sklearn.metrics import roc_auc_score

    d = generate(300, 200, seed=0)
    y = (d.interactions.ratings["rating"] >= 4).to_numpy()
    assert roc_auc_score(y, d.truth["true_score"]) > 0.9
    u = d.interactions.ratings["user_id"].str[1:].astype(int).to_numpy()
    i = d.interactions.ratings["item_id"].str[1:].astype(int).to_numpy()
    genre_only = d.truth["affinity"][u, d.truth["item_genres"][i, 0]]
    assert 0.6 < roc_auc_score(y, genre_only) < roc_auc_score(y, d.truth["true_score"]) - 0.05
    paths = d.write(tmp_path, "parquet")
    back = load_interactions(paths["interactions"], "generic", items=paths["items"])
    pd.testing.assert_frame_equal(back.ratings, d.interactions.ratings)
    assert set(json.loads((tmp_path / "truth.json").read_text())["genres"]) == set(GENRES)


def test_template_reason_begins_with_verdict_and_cites_evidence():
    r = template_reason(1, "Galaxy Robot (1999)", ["sci-fi"], ["Orbit Nebula (1970)", "Love Kiss (1980)"],
                        [["sci-fi"], ["romance"]], [1, 0])
    assert r.startswith("Yes. because the user liked one sci-fi movie") and '"Orbit Nebula (1970)"' in r
    r = template_reason(0, "Crypt Curse (1990)", ["horror"], ["Haunted Ghoul (1970)", "Ghoul Blood (1971)"],
                        [["horror"], ["horror"]], [0, 0])
    assert r.startswith("No. because the user disliked several horror movies")
    assert template_reason(0, "Elf Sword (2000)", ["fantasy"], [], [], []).startswith("No. because")


def test_synthetic_personas_are_planted_groups():
    d = generate(200, 150, seed=0, n_personas=3)
    aff, persona = d.truth["affinity"], d.truth["persona"]
    assert set(persona.tolist()) == {0, 1, 2}
    for p in range(3):
        loved = (aff[persona == p] >= 1.0)
        assert loved.all(axis=0).sum() == 2  # every member shares the persona's two loved genres
    assert (generate(50, 40, min_per_user=5, max_per_user=10, seed=0, n_personas=0).truth["persona"] == -1).all()


def test_generic_date_strings_and_loose_json_hint(tmp_path):
    (tmp_path / "d.csv").write_text("user_id,item_id,rating,timestamp\na,x,5,2016-03-09 00:00:00\nb,y,3,2016-03-10\n")
    d = load_interactions(tmp_path / "d.csv", "generic")
    assert d.ratings["timestamp"].tolist() == [1457481600, 1457568000]
    (tmp_path / "e.csv").write_text("user_id,item_id,rating,timestamp\na,x,5,2016-03-09\nb,y,3,someday\n")
    with pytest.raises(DataError) as err:
        load_interactions(tmp_path / "e.csv", "generic")
    assert (err.value.line, err.value.field) == (3, "timestamp")
    (tmp_path / "loose.json").write_text("{'reviewerID': 'A', 'asin': 'B', 'overall': 5.0}\n")
    with pytest.raises(DataError, match="loose JSON"):
        load_interactions(tmp_path / "loose.json", "amazon")


def test_synthetic_user_leniency_shows_in_each_users_labels():
    """user_bias draws a per-user rating leniency: users' positive rates follow it; the default world has none
    (and draws nothing for it, so default worlds are unchanged)."""
    from scipy.stats import spearmanr

    plain = generate(200, 150, seed=0, n_personas=0)
    assert (plain.truth["leniency"] == 0).all()
    d = generate(200, 150, seed=0, n_personas=0, user_bias=0.8)
    assert d.truth["leniency"].std() == pytest.approx(0.8, rel=0.2)
    r = d.interactions.ratings.assign(pos=lambda x: x["rating"] >= 4)
    rate = r.groupby("user_id")["pos"].mean()
    users = rate.index.str[1:].astype(int)
    assert spearmanr(rate.to_numpy(), d.truth["leniency"][users]).statistic > 0.6
    # the same draws otherwise: only the ratings move
    pd.testing.assert_frame_equal(d.interactions.items, plain.interactions.items)
    assert (d.interactions.ratings["item_id"] == plain.interactions.ratings["item_id"]).all()
