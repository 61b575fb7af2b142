"""Few-shot image classification data: episodes, class splits, sklearn digits and font glyphs.

A dataset is one float32 array ``images [classes, instances, H, W]`` in [0, 1] (every class with
the same number of instances) plus a name per class. Classes are split once into meta-train and
meta-test classes (:func:`split_classes`); an N-way K-shot episode draws N classes of one split,
gives them the labels 0..N-1 in a random order, and draws K support and Q query instances per
class (:func:`sample_episodes`). Everything is a pure numpy function of ``(seed, index)``, so a
training stream and a held-out evaluation set are just two seeds.

Two sources:

- :func:`load_digits`: the real 8x8 handwritten digits bundled with scikit-learn (UCI optdigits),
  10 classes truncated to the 174 instances of the smallest. With a 5 / 5 class split, every
  5-way test episode uses all five test classes; only their label order and instances vary.
- :func:`load_glyphs`: a SYNTHETIC Omniglot-like set. Classes are letters (Unicode category L*)
  covered by at least ``min_fonts`` of the 18 Unicode text fonts matplotlib bundles (DejaVu,
  STIXGeneral; see :func:`font_paths`); instances are those
  fonts rendered with PIL plus a small random affine jitter (rotation, scale, shift). It is
  printed type, not handwriting: numbers on it are not comparable with Omniglot's. Visual
  duplicates across scripts (Latin "A", Greek "Alpha", Cyrillic "A") are removed by comparing
  renderings in one reference font. Rendered arrays are cached as .npz under
  ``~/.cache/ftlab/`` keyed by a hash of the settings.

References:
    Vinyals et al., "Matching Networks for One Shot Learning" (the episodic N-way K-shot
    protocol), https://arxiv.org/abs/1606.04080
    Finn et al., "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks",
    https://arxiv.org/abs/1703.03400
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import unicodedata

import numpy as np

__all__ = [
    "Dataset",
    "load_digits",
    "split_classes",
    "sample_episodes",
    "sample_batch",
    "font_paths",
    "load_glyphs",
]


# Not instances of the characters their cmaps claim: placeholder glyphs (LastResort), STIX size
# variants and non-Unicode alternates, and the BaKoMa Computer Modern fonts (TeX encodings, e.g.
# cmsy10 maps "L" to a circled plus).
_SKIP_FONTS = ("LastResort", "STIXSiz", "STIXNonUni", "cm")


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Class-major images.

    Attributes:
      images: float32 ``[classes, instances, H, W]`` in [0, 1].
      names: one name per class (a digit, or the character itself).
      synthetic: True for rendered glyphs.
    """

    images: np.ndarray
    names: tuple[str, ...]
    synthetic: bool


def load_digits() -> Dataset:
    """The sklearn digits, ``[10, 174, 8, 8]`` (each class truncated to the smallest's count).

    >>> d = load_digits()
    >>> d.images.shape, d.images.dtype, float(d.images.max())
    ((10, 174, 8, 8), dtype('float32'), 1.0)
    """
    from sklearn import datasets

    raw = datasets.load_digits()
    images = raw.images.astype(np.float32) / 16.0
    per_class = [images[raw.target == c] for c in range(10)]
    m = min(len(x) for x in per_class)
    return Dataset(np.stack([x[:m] for x in per_class]), tuple("0123456789"), synthetic=False)


def split_classes(num_classes: int, *, num_train: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded partition of ``range(num_classes)`` into meta-train and meta-test class ids.

    Returns:
      ``(train, test)``, sorted int arrays of lengths ``num_train`` and
      ``num_classes - num_train``; disjoint, together all classes.

    >>> train, test = split_classes(10, num_train=5, seed=0)
    >>> sorted(np.concatenate([train, test]).tolist()) == list(range(10))
    True
    """
    if not 0 < num_train < num_classes:
        raise ValueError(f"num_train={num_train}; expected 0 < num_train < {num_classes} classes")
    perm = np.random.default_rng(seed).permutation(num_classes)
    return np.sort(perm[:num_train]), np.sort(perm[num_train:])


def sample_episodes(
    images: np.ndarray,
    class_ids: np.ndarray,
    seed: int,
    index: int,
    *,
    num_tasks: int,
    ways: int,
    shots: int,
    query: int,
) -> dict:
    """Samples ``num_tasks`` N-way K-shot episodes from the classes ``class_ids``.

    Each episode draws ``ways`` distinct classes, labels them 0..ways-1 in a random order, and
    draws ``shots + query`` distinct instances per class. Support and query are class-major:
    ``y = [0]*shots + [1]*shots + ...``.

    Args:
      images: ``[classes, instances, H, W]``.
      class_ids: the classes of this split (e.g. the meta-test classes).
      seed: the stream's seed; index: which batch of the stream (e.g. the meta-step).
      num_tasks, ways, shots, query: episodes, N, K, and Q query examples per class.

    Returns:
      ``{"support": {"x": [T, N*K, H, W], "y": int32 [T, N*K]},
      "query": {"x": [T, N*Q, H, W], "y": int32 [T, N*Q]}, "classes": int32 [T, N]}``, where
      ``classes[t, j]`` is the dataset class that has label ``j`` in episode ``t``.

    Raises:
      ValueError: more ways than classes in the split, or more shots + query than instances.

    >>> d = np.zeros((10, 20, 4, 4), np.float32)
    >>> e = sample_episodes(d, np.arange(5), 0, 0, num_tasks=3, ways=5, shots=1, query=2)
    >>> e["support"]["x"].shape, e["query"]["y"].shape, e["classes"].shape
    ((3, 5, 4, 4), (3, 10), (3, 5))
    """
    class_ids = np.asarray(class_ids)
    num_classes, num_instances = images.shape[:2]
    if ways > len(class_ids):
        raise ValueError(f"ways={ways} but the split has only {len(class_ids)} classes")
    if shots + query > num_instances:
        raise ValueError(
            f"shots + query = {shots + query} but each class has {num_instances} instances"
        )
    if class_ids.size and (class_ids.min() < 0 or class_ids.max() >= num_classes):
        raise ValueError(f"class_ids must lie in [0, {num_classes}); got {class_ids}")
    rng = np.random.default_rng([seed, index])
    # Row-wise random permutations, truncated: distinct classes / instances per episode.
    pick = np.argsort(rng.random((num_tasks, len(class_ids))), axis=1)[:, :ways]
    classes = class_ids[pick]  # [T, N], label j <-> classes[:, j]
    inst = np.argsort(rng.random((num_tasks, ways, num_instances)), axis=2)[..., : shots + query]
    x = images[classes[:, :, None], inst]  # [T, N, K + Q, H, W]
    hw = images.shape[2:]

    def part(sl, k):
        return {
            "x": x[:, :, sl].reshape(num_tasks, ways * k, *hw),
            "y": np.broadcast_to(
                np.repeat(np.arange(ways, dtype=np.int32), k), (num_tasks, ways * k)
            ).copy(),
        }

    return {
        "support": part(slice(0, shots), shots),
        "query": part(slice(shots, shots + query), query),
        "classes": classes.astype(np.int32),
    }


def sample_batch(
    images: np.ndarray, class_ids: np.ndarray, seed: int, index: int, *, batch_size: int
) -> dict:
    """A plain classification batch over all classes of a split (the pretraining baseline).

    Returns:
      ``{"x": [batch_size, H, W], "y": int32 [batch_size]}`` where ``y`` indexes ``class_ids``.
    """
    rng = np.random.default_rng([seed, index])
    y = rng.integers(0, len(class_ids), batch_size)
    i = rng.integers(0, images.shape[1], batch_size)
    return {"x": images[np.asarray(class_ids)[y], i], "y": y.astype(np.int32)}


# -- glyphs (synthetic) --------------------------------------------------------------------------
def font_paths() -> list[pathlib.Path]:
    """matplotlib's bundled TTFs that are Unicode text fonts (18 DejaVu and STIXGeneral files)."""
    import matplotlib

    root = pathlib.Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    return [p for p in sorted(root.glob("*.ttf")) if not p.name.startswith(_SKIP_FONTS)]


def load_glyphs(
    *,
    size: int = 20,
    num_classes: int = 300,
    instances: int = 16,
    min_fonts: int = 8,
    max_rotation: float = 10.0,
    max_scale: float = 0.1,
    max_shift: int = 1,
    seed: int = 0,
    cache_dir: str | pathlib.Path | None = "~/.cache/ftlab",
) -> Dataset:
    """SYNTHETIC glyph classes from matplotlib's fonts, ``[classes, instances, size, size]``.

    Candidate classes are letters covered by at least ``min_fonts`` fonts, minus visual
    duplicates; ``num_classes`` of them are taken evenly spaced in code-point order (so every
    script contributes). Instance ``i`` of a class is font ``i mod fonts`` (in a seeded order)
    rendered with a random rotation in ``+-max_rotation`` degrees, a scale in
    ``1 +- max_scale`` and a shift of up to ``max_shift`` pixels, the glyph's ink box fitted to
    ``size - 4`` pixels. Deterministic for fixed arguments (and fixed font files).

    Args:
      size: image side in pixels.
      num_classes: classes kept (at most the number of candidates).
      instances: instances per class.
      min_fonts: fonts that must cover a character for it to be a class.
      max_rotation, max_scale, max_shift: the affine jitter.
      seed: jitter and font-order seed.
      cache_dir: where the .npz cache lives; None disables caching.

    Returns:
      A :class:`Dataset` with ``synthetic=True``; ``names`` are the characters.
    """
    settings = dict(
        size=size,
        num_classes=num_classes,
        instances=instances,
        min_fonts=min_fonts,
        max_rotation=max_rotation,
        max_scale=max_scale,
        max_shift=max_shift,
        seed=seed,
        fonts=[p.name for p in font_paths()],
        version=2,
    )
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    path = None
    if cache_dir is not None:
        path = pathlib.Path(cache_dir).expanduser() / f"glyphs_{key}.npz"
        if path.exists():
            with np.load(path) as z:
                return Dataset(z["images"], tuple(str(c) for c in z["names"]), synthetic=True)
    images, names = _render_glyphs(
        **{k: v for k, v in settings.items() if k not in ("fonts", "version")}
    )
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, images=images, names=np.array(names))
        tmp.replace(path)
    return Dataset(images, tuple(names), synthetic=True)


def _coverage(fonts: list[pathlib.Path]) -> dict[int, list[int]]:
    """Code point -> indices of the fonts whose cmap covers it (letters only)."""
    from fontTools import ttLib

    cover: dict[int, list[int]] = {}
    for i, f in enumerate(fonts):
        for cp in ttLib.TTFont(f, lazy=True)["cmap"].getBestCmap():
            if unicodedata.category(chr(cp)).startswith("L"):
                cover.setdefault(cp, []).append(i)
    return cover


def _render(font, ch: str, size: int, *, angle=0.0, scale=1.0, shift=(0, 0)) -> np.ndarray:
    """One glyph, ink box fitted into ``size - 4`` pixels, jittered; float32 ``[size, size]``."""
    from PIL import Image, ImageDraw

    big = 4 * size
    canvas = Image.new("L", (3 * big, 3 * big), 0)
    ImageDraw.Draw(canvas).text((big, big), ch, fill=255, font=font)
    box = canvas.getbbox()
    if box is None:
        return np.zeros((size, size), np.float32)
    glyph = canvas.crop(box)
    w, h = glyph.size
    side = max(w, h)
    square = Image.new("L", (side, side), 0)
    square.paste(glyph, ((side - w) // 2, (side - h) // 2))
    square = square.rotate(angle, resample=Image.BILINEAR, expand=True)
    inner = max(1, int(round((size - 4) * scale)))
    small = square.resize((inner, inner), Image.BOX)
    out = Image.new("L", (size, size), 0)
    out.paste(small, ((size - inner) // 2 + shift[0], (size - inner) // 2 + shift[1]))
    return np.asarray(out, np.float32) / 255.0


def _render_glyphs(
    *, size, num_classes, instances, min_fonts, max_rotation, max_scale, max_shift, seed
) -> tuple[np.ndarray, list[str]]:
    from PIL import ImageFont

    paths = font_paths()
    fonts = [ImageFont.truetype(str(p), 3 * size) for p in paths]
    cover = {cp: fs for cp, fs in _coverage(paths).items() if len(fs) >= min_fonts}
    # Drop visual duplicates: identical renderings in the first covering reference font.
    ref = min(range(len(paths)), key=lambda i: -sum(i in fs for fs in cover.values()))
    seen, candidates = set(), []
    for cp in sorted(cover):
        if ref not in cover[cp]:
            continue
        img = _render(fonts[ref], chr(cp), size)
        sig = (np.round(img * 4)).astype(np.uint8).tobytes()
        if img.max() > 0 and sig not in seen:
            seen.add(sig)
            candidates.append(cp)
    if num_classes > len(candidates):
        raise ValueError(
            f"num_classes={num_classes} but only {len(candidates)} letters are covered by "
            f">= min_fonts={min_fonts} fonts"
        )
    chosen = [candidates[i] for i in np.linspace(0, len(candidates) - 1, num_classes).astype(int)]
    rng = np.random.default_rng(seed)
    images = np.zeros((num_classes, instances, size, size), np.float32)
    for c, cp in enumerate(chosen):
        order = rng.permutation(cover[cp])
        for i in range(instances):
            images[c, i] = _render(
                fonts[order[i % len(order)]],
                chr(cp),
                size,
                angle=rng.uniform(-max_rotation, max_rotation),
                scale=1.0 + rng.uniform(-max_scale, max_scale),
                shift=tuple(rng.integers(-max_shift, max_shift + 1, 2)),
            )
    return images, [chr(cp) for cp in chosen]
