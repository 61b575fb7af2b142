"""Human sentiment ratings of short texts (Hutto & Gilbert 2014), from VADER's source archive.

Only the source archive of `vadersentiment` 3.3.2 holds them: `install.sh` fetches
`vaderSentiment-3.3.2.tar.gz` (``pip download --no-deps --no-binary :all:``), checks its sha256
and keeps it, unbuilt, in ``<venv>/share/ftlab/`` (`archive_path`). Inside,
``additional_resources/hutto_ICWSM_2014.tar.gz`` holds per source a ``*_GroundTruth.txt`` (id,
mean rating, text) and a ``*_anonDataRatings.txt`` (id, mean, std, every rater's score on the
integer scale -4..4), tab-separated. Both are read from inside the two archives; nothing is
unpacked to disk.

Sources (`SOURCES`): ``movies``, 10,605 Rotten Tomatoes snippets (Pang & Lee's sentence
polarity data, the source of `ftlab.data.rotten_tomatoes`; 15-29 raters each, 18.7 on average);
``tweets``, 4,200 (20 raters, or 92-99 for 1,000 of them); ``amazon``, 3,708 review sentences;
``nyt``, 5,190 editorial sentences (20 raters each).

What the files hold, checked here: the text files are UTF-8 (DATA.md and the issue call them
Latin-1; the movie file's 133 accented snippets only decode right as UTF-8, e.g. "Münch"), the
Amazon ratings file starts with a byte-order mark, and rows of the two files of a source are
joined by id (the Amazon files list them in different orders). For 199 tweets the ground-truth
mean differs from the mean of the listed ratings (by up to 1.1; the ratings file's own mean
column agrees with its ratings everywhere); `Snippets.mean` is the ground truth's, as in the
paper.

`split_movies` puts each movie snippet on the side of `rotten_tomatoes.load`'s split where its
text lies (texts matched after `normalize`; 10,453 of the 10,605 are in ftlab's Rotten Tomatoes
data), so a reward model trained on the train ratings never saw a test review of the other task.

References:
    Hutto & Gilbert, "VADER: A Parsimonious Rule-based Model for Sentiment Analysis of Social
    Media Text", ICWSM 2014, https://ojs.aaai.org/index.php/ICWSM/article/view/14550
"""

from __future__ import annotations

import ast
import hashlib
import io
import pathlib
import re
import sys
import tarfile
import unicodedata
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

__all__ = [
    "ARCHIVE_NAME",
    "ARCHIVE_SHA256",
    "COUNTS",
    "SOURCES",
    "Snippets",
    "archive_path",
    "held_out_rater",
    "load",
    "normalize",
    "pairs",
    "split_movies",
    "vader_scores",
]

ARCHIVE_NAME = "vaderSentiment-3.3.2.tar.gz"
ARCHIVE_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
_INNER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
_FOLDER = "hutto_ICWSM_2014"
SOURCES = {
    "movies": "movieReviewSnippets",
    "tweets": "tweets",
    "amazon": "amazonReviewSnippets",
    "nyt": "nytEditorialSnippets",
}
COUNTS = {"movies": 10_605, "tweets": 4_200, "amazon": 3_708, "nyt": 5_190}
_SCALE = (-4, 4)


class Snippets(NamedTuple):
    """Rated texts of one source, in the ground-truth file's order.

    Attributes:
        ids: The file's ids (``"17"``, or ``"263_6"`` for document ``263``, sentence ``6``).
        text: The texts.
        mean: float64 ``[n]`` mean human rating on -4..4 (the ground-truth file's).
        ratings: Each rater's integer score per text, int8 arrays of 15 to 99 entries.
    """

    ids: list[str]
    text: list[str]
    mean: np.ndarray
    ratings: list[np.ndarray]


def archive_path() -> pathlib.Path:
    """Where `install.sh` keeps the source archive: ``<sys.prefix>/share/ftlab/``."""
    return pathlib.Path(sys.prefix, "share", "ftlab", ARCHIVE_NAME)


def _read_member(archive: pathlib.Path, check_hash: bool) -> tarfile.TarFile:
    if not archive.is_file():
        raise FileNotFoundError(
            f"{archive} is missing: the ratings ship in the source archive of "
            "vadersentiment==3.3.2; run `bash install.sh` from the repository root, or pass "
            f"archive= the downloaded {ARCHIVE_NAME}."
        )
    raw = archive.read_bytes()
    if check_hash:
        digest = hashlib.sha256(raw).hexdigest()
        if digest != ARCHIVE_SHA256:
            raise ValueError(
                f"{archive}: sha256 is {digest}, expected {ARCHIVE_SHA256}; download it again "
                "(`bash install.sh`), or pass check_hash=False if you changed it on purpose."
            )
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:gz") as outer:
        member = outer.extractfile(_INNER)
        if member is None:
            raise ValueError(f"{archive} has no file {_INNER}.")
        inner = member.read()
    return tarfile.open(fileobj=io.BytesIO(inner), mode="r:gz")


def _lines(tar: tarfile.TarFile, name: str) -> list[tuple[str, list[str]]]:
    member = tar.extractfile(f"{_FOLDER}/{name}")
    if member is None:
        raise ValueError(f"the ratings archive has no file {_FOLDER}/{name}.")
    text = member.read().decode("utf-8-sig")  # UTF-8; the Amazon ratings file has a BOM
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            out.append((f"{name} line {i}", line.split("\t")))
    return out


def load(
    source: str = "movies",
    *,
    archive: str | pathlib.Path | None = None,
    check_hash: bool = True,
) -> Snippets:
    """Reads one source's texts, mean ratings and every rater's score.

    Args:
        source: One of `SOURCES`.
        archive: The `vaderSentiment-3.3.2.tar.gz` file; None: `archive_path()`.
        check_hash: Check the archive against `ARCHIVE_SHA256`.

    Returns:
        The `Snippets` (``COUNTS[source]`` of them).

    Raises:
        ValueError: an unknown source; or naming the file and line of a row with the wrong
            number of fields, a rating outside -4..4, a ratings row whose mean column disagrees
            with its ratings, or ids that the two files do not share.
        FileNotFoundError: the archive is missing.
    """
    if source not in SOURCES:
        raise ValueError(f"source={source!r}; expected one of {sorted(SOURCES)}.")
    path = archive_path() if archive is None else pathlib.Path(archive)
    stem = SOURCES[source]
    with _read_member(path, check_hash) as tar:
        truth = _lines(tar, f"{stem}_GroundTruth.txt")
        rated = _lines(tar, f"{stem}_anonDataRatings.txt")
    ratings = {}
    for where, fields in rated:
        if len(fields) != 4:
            raise ValueError(f"{where}: expected 4 tab-separated fields, got {len(fields)}.")
        scores = np.asarray(ast.literal_eval(fields[3]), np.int8)
        if (
            scores.ndim != 1
            or not len(scores)
            or scores.min() < _SCALE[0]
            or scores.max() > _SCALE[1]
        ):
            raise ValueError(f"{where}: ratings must be a non-empty list of integers in -4..4.")
        if abs(float(scores.mean()) - float(fields[1])) > 1e-6:
            raise ValueError(f"{where}: mean {fields[1]} is not the mean of its ratings.")
        ratings[fields[0]] = scores
    ids, texts, means, per_rater = [], [], [], []
    for where, fields in truth:
        if len(fields) != 3:
            raise ValueError(f"{where}: expected 3 tab-separated fields, got {len(fields)}.")
        if fields[0] not in ratings:
            raise ValueError(f"{where}: id {fields[0]!r} has no row in {stem}_anonDataRatings.txt.")
        ids.append(fields[0])
        means.append(float(fields[1]))
        texts.append(fields[2])
        per_rater.append(ratings.pop(fields[0]))
    if ratings:
        extra = sorted(ratings)[:3]
        raise ValueError(
            f"{stem}_anonDataRatings.txt has ids missing from the ground truth: {extra}."
        )
    return Snippets(ids, texts, np.asarray(means, np.float64), per_rater)


def normalize(text: str) -> str:
    """Lower-case letters and digits only, accents removed: the key that matches a snippet to
    its Rotten Tomatoes row whatever the quoting, spacing, dashes or encoding.

    >>> normalize('"Amy\\'s O\\'s honesty -- will win you over."')
    'amysoshonestywillwinyouover'
    """
    folded = unicodedata.normalize("NFKD", text)
    folded = "".join(c for c in folded if not unicodedata.combining(c)).lower()
    return re.sub(r"[^a-z0-9]+", "", folded)


_ORDER = ("test", "validation", "train")  # a text in two splits goes to the held-out one


def split_movies(
    snippets: Snippets,
    *,
    seed: int = 0,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
) -> dict[str, np.ndarray]:
    """Indices of the movie snippets per split, on the side of ftlab's Rotten Tomatoes split.

    Each snippet whose normalised text is a review in `rotten_tomatoes.load(task="sentiment",
    seed=..., ...)` goes to that review's split; a text found in two splits (Rotten Tomatoes
    repeats some reviews) goes to the held-out one, test before validation. The snippets not
    in that data (152 with the defaults) are split by a permutation with ``seed`` in the same
    proportions.

    Args:
        snippets: ``load("movies")``.
        seed, validation_fraction, test_fraction: Passed to `rotten_tomatoes.load`.

    Returns:
        ``{"train", "validation", "test"}`` ascending int64 indices into ``snippets``.
    """
    from ftlab.data import rotten_tomatoes  # noqa: PLC0415 (pandas, only here)

    data = rotten_tomatoes.load(
        task="sentiment", seed=seed, validation_fraction=validation_fraction,
        test_fraction=test_fraction,
    )  # fmt: skip
    side: dict[str, str] = {}
    for name in reversed(_ORDER):  # held-out splits last, so they win
        for text in data[name].text:
            side[normalize(text)] = name
    found = [side.get(normalize(t)) for t in snippets.text]
    missing = np.array([i for i, s in enumerate(found) if s is None], np.int64)
    perm = missing[np.random.default_rng(seed).permutation(len(missing))]
    n_val, n_test = round(len(missing) * validation_fraction), round(len(missing) * test_fraction)
    for i in perm[:n_val]:
        found[i] = "validation"
    for i in perm[n_val : n_val + n_test]:
        found[i] = "test"
    for i in perm[n_val + n_test :]:
        found[i] = "train"
    labels = np.array(found)
    return {name: np.flatnonzero(labels == name) for name in ("train", "validation", "test")}


def pairs(
    mean: np.ndarray, *, min_difference: float = 1.0, num_pairs: int | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of snippets whose mean ratings differ by at least ``min_difference``.

    Args:
        mean: ``[n]`` mean ratings (of one split's snippets).
        min_difference: Smallest difference of means that makes a pair (must be positive).
        num_pairs: Draw this many pairs uniformly (with replacement, seeded); None: every pair,
            ordered by ``(chosen, rejected)``.
        seed: Seed of the draw.

    Returns:
        ``(chosen, rejected)`` int64 index arrays, ``mean[chosen] - mean[rejected] >=
        min_difference``: the Bradley-Terry loss's preferred and other snippet.

    >>> pairs(np.array([0.0, 1.5, 0.8]), min_difference=1.0)
    (array([1]), array([0]))
    """
    mean = np.asarray(mean, np.float64)
    if min_difference <= 0:
        raise ValueError(f"min_difference={min_difference} must be positive.")
    if num_pairs is None:
        chosen, rejected = np.nonzero(mean[:, None] - mean[None, :] >= min_difference)
        return chosen.astype(np.int64), rejected.astype(np.int64)
    if num_pairs < 1:
        raise ValueError(f"num_pairs={num_pairs} must be positive or None.")
    rng = np.random.default_rng(seed)
    order = np.argsort(mean, kind="stable")
    sorted_mean = mean[order]
    # for each snippet, the snippets at least min_difference below it: a prefix of the order
    below = np.searchsorted(sorted_mean, sorted_mean - min_difference, side="right")
    if below.sum() == 0:
        raise ValueError(f"no two snippets' means differ by min_difference={min_difference}.")
    # chosen with probability proportional to its number of partners: uniform over all pairs
    top = rng.choice(len(mean), size=num_pairs, p=below / below.sum())
    partner = (rng.random(num_pairs) * below[top]).astype(np.int64)
    return order[top].astype(np.int64), order[partner].astype(np.int64)


def held_out_rater(snippets: Snippets, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One random rater's score per snippet, and the mean of the other raters.

    The human baseline of Hutto & Gilbert's comparison: how well a single person agrees with
    the crowd. Correlate the two arrays (`ftlab.posttrain.metrics`).

    Returns:
        ``(one rater [n], mean of the others [n])``, float64.
    """
    rng = np.random.default_rng(seed)
    one, rest = np.empty(len(snippets.ratings)), np.empty(len(snippets.ratings))
    for i, r in enumerate(snippets.ratings):
        k = rng.integers(len(r))
        one[i] = r[k]
        rest[i] = (r.sum(dtype=np.float64) - r[k]) / (len(r) - 1)
    return one, rest


def vader_scores(texts: Sequence[str]) -> np.ndarray:
    """VADER's compound score (-1..1) of each text: the paper's rule-based baseline.

    Needs the `vadersentiment==3.3.2` wheel (installed by `install.sh`, without its
    `requests` dependency, which only its demo uses).
    """
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer  # noqa: PLC0415
    except ImportError:
        raise ImportError(
            "vader_scores needs the vadersentiment==3.3.2 wheel; run `bash install.sh`."
        ) from None
    analyzer = SentimentIntensityAnalyzer()
    return np.array([analyzer.polarity_scores(t)["compound"] for t in texts], np.float64)
