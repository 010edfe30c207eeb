"""Image clean-up of web pages (DuetGen §3): filters for images that carry no content, removal of
near-identical neighbours, and moving each image after the text that describes it.

- `WebImageFilter`: ads and trackers by URL and alt text (before fetching anything), then
  broken (missing or undecodable), tiny, icons and logos (small and near square, or named so),
  banners (extreme aspect) and QR codes (OpenCV's detector).
- `NearDuplicates`: a perceptual hash (imagehash pHash) per image; an image within
  `max_distance` bits of the previous kept image is dropped.
- `Reorder`: how-to pages often show a step's picture before the step; an image whose alt text
  and caption share more words with a following text block (within `window`) than with the one
  before it is moved right after that block.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from tapestry.data.operators.base import Rejected
from tapestry.data.operators.objects import content_words

AD_URL_PATTERNS = ("doubleclick.", "googlesyndication", "googleadservices", "adservice", "adsystem", "/ads/",
                   "/ad/", "/adv/", "advert", "banner", "sponsor", "affiliate", "/track", "tracker", "tracking",
                   "pixel", "beacon", "analytics", "facebook.com/tr", "/1x1", "spacer.gif", "clear.gif")
AD_ALT_WORDS = ("advertisement", "advertising", "sponsored", "ad", "ads", "promo", "promotion", "buy now")
ICON_WORDS = ("logo", "icon", "avatar", "favicon", "badge", "button", "emoji", "sprite")


@dataclass(frozen=True)
class WebImageFilter:
    name: ClassVar[str] = "image-filter"
    version: ClassVar[str] = "1"

    min_side: int = 64  # shorter side below this: tiny
    icon_max_side: int = 200  # this small and near square (below): an icon or a logo
    icon_max_aspect: float = 1.25
    max_aspect: float = 4.0  # banners and dividers
    qr_codes: bool = True

    def by_reference(self, src: str, alt: str) -> None:
        """Reject from the URL and alt text alone (nothing fetched): ads, trackers, named icons."""
        lowered = src.lower()
        if not lowered.startswith("data:"):
            hit = next((p for p in AD_URL_PATTERNS if p in lowered), None)
            if hit:
                raise Rejected(self.name, "ad", f"ad or tracker URL ({hit!r} in {src[:120]!r})")
        words = set(re.findall(r"[a-z]+", alt.lower()))
        phrase = " ".join(re.findall(r"[a-z]+", alt.lower()))
        ad = next((w for w in AD_ALT_WORDS if (" " in w and w in phrase) or w in words), None)
        if ad:
            raise Rejected(self.name, "ad", f"alt text says {ad!r}: {alt[:80]!r}")
        name = re.sub(r"[^a-z]+", " ", urlpath_name(src).lower())
        icon = next((w for w in ICON_WORDS if w in words or w in name.split()), None)
        if icon:
            raise Rejected(self.name, "icon", f"named as a {icon} ({alt[:60] or urlpath_name(src)!r})")

    def by_pixels(self, rgb: np.ndarray) -> None:
        h, w = rgb.shape[:2]
        if min(h, w) < self.min_side:
            raise Rejected(self.name, "tiny", f"{w}x{h} is under {self.min_side} px a side")
        aspect = max(w, h) / max(1, min(w, h))
        if max(h, w) <= self.icon_max_side and aspect <= self.icon_max_aspect:
            raise Rejected(self.name, "icon", f"{w}x{h}: small and near square (an icon or a logo)")
        if aspect > self.max_aspect:
            raise Rejected(self.name, "aspect", f"{w}x{h}: aspect {aspect:.1f} over {self.max_aspect} (a banner)")
        if self.qr_codes and has_qr_code(rgb):
            raise Rejected(self.name, "qr-code", "OpenCV's QR detector found a code")


def urlpath_name(src: str) -> str:
    import urllib.parse

    if src.startswith("data:"):
        return ""
    return urllib.parse.urlparse(src).path.rsplit("/", 1)[-1]


def has_qr_code(rgb: np.ndarray) -> bool:
    import cv2

    grey = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    if max(grey.shape) > 1024:  # the detector's cost grows with pixels; codes stay findable
        scale = 1024 / max(grey.shape)
        grey = cv2.resize(grey, (round(grey.shape[1] * scale), round(grey.shape[0] * scale)),
                          interpolation=cv2.INTER_AREA)
    try:
        found, points = cv2.QRCodeDetector().detect(grey)
    except cv2.error:
        return False
    return bool(found) and points is not None


@dataclass(frozen=True)
class NearDuplicates:
    name: ClassVar[str] = "dedupe"
    version: ClassVar[str] = "1"

    max_distance: int = 8  # pHash bits (of 64) within which two images count as the same picture

    @staticmethod
    def fingerprint(rgb: np.ndarray) -> Any:
        import imagehash
        from PIL import Image

        return imagehash.phash(Image.fromarray(rgb))

    def same(self, a: Any, b: Any) -> int | None:
        """The distance when `a` and `b` are near-identical, else None."""
        distance = int(a - b)
        return distance if distance <= self.max_distance else None


@dataclass(frozen=True)
class Reorder:
    name: ClassVar[str] = "reorder"
    version: ClassVar[str] = "1"

    window: int = 2  # text blocks after an image that may be the one describing it
    min_overlap: float = 0.25  # share of the image's description words a block must share

    def order(self, items: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
        """`items` (dicts with "kind" and, for images, "describe") with each image placed after
        the text that describes it; returns the new order and how many images moved."""
        texts = [i for i, item in enumerate(items) if item["kind"] != "image"]
        placement: dict[int, int] = {}  # image index -> text index it goes after (-1: the start)
        for i, item in enumerate(items):
            if item["kind"] != "image":
                continue
            words = content_words(item.get("describe", ""))
            before = [t for t in texts if t < i]
            after = [t for t in texts if t > i][: self.window]
            prev = before[-1] if before else -1

            scores = {t: len(words & content_words(items[t]["text"])) / max(1, len(words)) for t in after}
            before_score = (len(words & content_words(items[prev]["text"])) / max(1, len(words))
                            if prev >= 0 else 0.0)
            best = max(after, key=lambda t: (scores[t], -t), default=None)
            if best is not None and words and scores[best] >= self.min_overlap and scores[best] > before_score:
                placement[i] = best
            else:
                placement[i] = prev
        out: list[dict[str, Any]] = [items[i] for i in sorted(placement) if placement[i] == -1]
        for t in texts:
            out.append(items[t])
            out.extend(items[i] for i in sorted(placement) if placement[i] == t)
        moved = sum(1 for i, t in placement.items() if t > i)
        return out, moved
