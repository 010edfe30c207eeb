"""`web-howto` (DuetGen §3, data engine for websites): how-to pages -> clean interleaved Documents.

Per page (an HTML or markdown file, or each HTML response of a WARC): main content as blocks
(trafilatura); each image is dropped when it is an ad or tracker (URL, alt text), broken (not
found next to the page or in the archive, undecodable), tiny, an icon or logo, a banner or a QR
code, or a near-duplicate of the image before it (pHash); the rest are captioned and categorized
by a VLM (categories outside `image_captions.keep` and irrelevant images dropped) and each is
moved after the text that describes it; an LLM rewrites the page into clean steps, and optionally
into a dialog:

    How to repot a plant                     text, context   (dialog: "User: How do I ...?")
    Prepare the pot: Fill the larger ...     text, target
    [img1]                                   image, target
    ...

Every dropped image is in the rejection log with its page and reason (not counted as failures).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from tapestry.data.operators.base import (
    Rejected,
    Rejection,
    StageStats,
    ask_stage,
    operator_versions,
)
from tapestry.data.operators.howto import Dialog, Rewrite, WebImageCaption
from tapestry.data.operators.video import resize_long_side
from tapestry.data.operators.web_images import NearDuplicates, Reorder, WebImageFilter
from tapestry.data.operators.webpage import PAGE_SUFFIXES, Extract, Page
from tapestry.data.pipelines import config as config_io
from tapestry.data.pipelines.video_common import map_concurrently
from tapestry.data.providers import BudgetExhausted
from tapestry.data.records import ImageEncoding, InputItem, InputResult
from tapestry.document import Document, TextSegment
from tapestry.storage import ImageRefused, decode_image


@dataclass(frozen=True)
class HowtoOutput:
    min_images: int = 1  # pages left with fewer images are text-only: rejected (DuetGen keeps none)
    max_images: int = 32
    image_max_side: int = 1024
    image: ImageEncoding = field(default_factory=ImageEncoding)


@dataclass(frozen=True)
class WebHowtoConfig:
    extract: Extract = field(default_factory=Extract)
    image_filter: WebImageFilter = field(default_factory=WebImageFilter)
    dedupe: NearDuplicates = field(default_factory=NearDuplicates)
    image_captions: WebImageCaption = field(default_factory=WebImageCaption)
    reorder: Reorder = field(default_factory=Reorder)
    rewrite: Rewrite = field(default_factory=Rewrite)
    dialog: Dialog = field(default_factory=Dialog)
    output: HowtoOutput = field(default_factory=HowtoOutput)
    seed: int = 0


def page_id(page: Page) -> str:
    stem = re.sub(r"[^\w.-]+", "-", page.name).strip("-.") or "page"
    return f"{stem[:80]}-{page.sha256[:8]}"


class WebHowto:
    name: ClassVar[str] = "web-howto"
    version: ClassVar[str] = "1"
    config_class: ClassVar[type] = WebHowtoConfig
    input_suffixes: ClassVar[tuple[str, ...]] = PAGE_SUFFIXES
    input_noun: ClassVar[str] = "pages"
    stages: ClassVar[tuple[str, ...]] = ("extract", "image-filter", "dedupe", "image-captions", "reorder",
                                         "rewrite", "dialog")

    def __init__(self, config: WebHowtoConfig):
        self.config = config
        self.fingerprint = config_io.fingerprint(config)

    def process(self, item: InputItem, provider: Any) -> InputResult:
        stats = StageStats()
        result = InputResult(item.key, item.shown)
        pages = self.config.extract.read(item.path)
        try:
            while True:
                with stats.timed("extract"):
                    page = next(pages, None)
                if page is None:
                    break
                record = page_id(page)
                try:
                    result.docs.append(self.document(page, record, item, provider, stats, result.rejections))
                except Rejected as r:
                    x = r.rejection
                    result.rejections.append(Rejection(x.stage, x.code, x.detail, record, x.failure))
        except Rejected as r:  # the file itself cannot be read
            result.failed = r.rejection.failure
            result.rejections.append(r.rejection)
        except BudgetExhausted as e:  # not done: the engine leaves this input for the next run
            result.stopped = str(e)
            return result
        result.stats = stats.to_json()
        return result

    # ----------------------------------------------------------------- images
    def clean_images(self, page: Page, record: str, stats: StageStats,
                     rejections: list[Rejection]) -> dict[int, tuple[str, np.ndarray]]:
        """Block index -> (key, pixels) of the images that pass the filters and the dedupe."""
        c = self.config
        kept: dict[int, tuple[str, np.ndarray]] = {}
        previous_hash = None
        number = 0
        for index, block in enumerate(page.blocks):
            if block.kind != "image":
                continue
            number += 1
            where = f"{record}/img{number}"
            try:
                with stats.timed(c.image_filter.name):
                    stats.count(c.image_filter.name, seen=1)
                    c.image_filter.by_reference(block.src, block.text)
                    data = page.fetch(block.src)
                    if data is None:
                        raise Rejected(c.image_filter.name, "broken", f"{block.src[:160]!r} is not available "
                                       "(not next to the page, not in the archive, or remote)")
                    try:
                        rgb = np.asarray(decode_image(data))
                    except ImageRefused as e:
                        raise Rejected(c.image_filter.name, "broken", f"{block.src[:120]!r}: {e}") from None
                    c.image_filter.by_pixels(rgb)
                    stats.count(c.image_filter.name, kept=1)
                with stats.timed(c.dedupe.name):
                    stats.count(c.dedupe.name, seen=1)
                    fingerprint = c.dedupe.fingerprint(rgb)
                    distance = c.dedupe.same(fingerprint, previous_hash) if previous_hash is not None else None
                    if distance is not None:
                        raise Rejected(c.dedupe.name, "near-duplicate",
                                       f"{block.src[:120]!r} is {distance} pHash bits from the image before it")
                    previous_hash = fingerprint
                    stats.count(c.dedupe.name, kept=1)
            except Rejected as r:
                rejections.append(Rejection(r.rejection.stage, r.rejection.code, r.rejection.detail, where))
                continue
            if max(rgb.shape[:2]) > c.output.image_max_side:
                rgb = resize_long_side(rgb, c.output.image_max_side)
            kept[index] = (f"img{number}", rgb)
        return kept

    # ---------------------------------------------------------------- document
    def document(self, page: Page, record: str, item: InputItem, provider: Any, stats: StageStats,
                 rejections: list[Rejection]) -> Document:
        c = self.config
        for kind, detail in page.dropped:  # not content: logged with the reason, never a step
            rejections.append(Rejection("extract", f"boilerplate-{kind}", detail, record))
        text_chars = sum(len(b.text) for b in page.blocks if b.kind != "image")
        stats.count("extract", seen=1)
        if text_chars < c.extract.min_text_chars:
            raise Rejected("extract", "too-little-text", f"{text_chars} characters of main text "
                           f"(under {c.extract.min_text_chars})")
        stats.count("extract", kept=1)
        kept = self.clean_images(page, record, stats, rejections)
        items: list[dict[str, Any]] = []
        for index, block in enumerate(page.blocks):
            if block.kind != "image":
                items.append({"kind": block.kind, "text": block.text})
            elif index in kept:
                items.append({"kind": "image", "key": kept[index][0], "alt": block.text, "src": block.src,
                              "index": index})
        pixels = {key: rgb for key, rgb in kept.values()}

        def context_of(i: int) -> str:
            near = [items[j]["text"] for j in (i - 1, i + 1) if 0 <= j < len(items) and items[j]["kind"] != "image"]
            return " ".join(near)

        images = [(i, it) for i, it in enumerate(items) if it["kind"] == "image"]

        def described(entry: tuple[int, dict[str, Any]]) -> dict[str, Any] | Rejection:
            i, it = entry
            try:
                return ask_stage(c.image_captions.name, provider,
                                 c.image_captions.request(pixels[it["key"]], it["alt"], context_of(i), page.title,
                                                          c.seed), WebImageCaption.check, stats)
            except Rejected as r:
                x = r.rejection
                return Rejection(x.stage, x.code, x.detail, f"{record}/{it['key']}", x.failure)

        outcomes = map_concurrently(described, images, provider.max_concurrency)
        dropped: set[str] = set()
        for (i, it), outcome in zip(images, outcomes):
            where = f"{record}/{it['key']}"
            if isinstance(outcome, Rejection):
                rejections.append(outcome)
                dropped.add(it["key"])
            elif outcome["category"] not in c.image_captions.keep:
                rejections.append(Rejection(c.image_captions.name, f"category-{outcome['category']}",
                                            outcome["caption"][:160], where))
                dropped.add(it["key"])
            elif not outcome["relevant"]:
                rejections.append(Rejection(c.image_captions.name, "irrelevant", outcome["caption"][:160], where))
                dropped.add(it["key"])
            else:
                it.update(caption=outcome["caption"], category=outcome["category"],
                          describe=f"{it['alt']} {outcome['caption']}")
        items = [it for it in items if it.get("key") not in dropped]
        with stats.timed(c.reorder.name):
            items, moved = c.reorder.order(items)
            n_images = sum(1 for it in items if it["kind"] == "image")
            stats.count(c.reorder.name, seen=n_images, kept=n_images)
        if n_images < c.output.min_images:
            raise Rejected("page", "too-few-images", f"{n_images} image(s) left (need {c.output.min_images})")
        keys = [it["key"] for it in items if it["kind"] == "image"][: c.output.max_images]
        plain_items = [{k: v for k, v in it.items() if k in ("kind", "text", "key", "caption")} for it in items]
        rewritten = ask_stage(c.rewrite.name, provider, c.rewrite.request(page.title, plain_items, c.seed),
                              c.rewrite.check(keys), stats)
        dialog = None
        if c.dialog.enabled:
            dialog = ask_stage(c.dialog.name, provider, c.dialog.request(rewritten["title"], rewritten["steps"],
                                                                         c.seed), Dialog.check, stats)
        by_key = {it["key"]: it for it in items if it["kind"] == "image"}
        encode = c.output.image
        if dialog is not None:
            segments: list[Any] = [TextSegment(f"User: {dialog['question']}"),
                                   TextSegment(f"Assistant: {dialog['opening']}", "target")]
        else:
            segments = [TextSegment(rewritten["title"])]
        used = 0
        for step in rewritten["steps"]:
            segments.append(TextSegment(step["text"], "target"))
            for key in step["images"]:
                it = by_key[key]
                segments.append(encode.segment(pixels[key], "target", key,
                                               {"src": it["src"][:500], "alt": it["alt"], "caption": it["caption"],
                                                "category": it["category"]}))
                used += 1
        if used < c.output.min_images:
            raise Rejected(c.rewrite.name, "images-dropped", f"the rewrite kept {used} of {len(keys)} image(s)")
        meta = {
            "source": {"path": item.shown, "page": page.name, "url": page.url, "sha256": page.sha256,
                       "title": page.title},
            "pipeline": {"name": self.name, "version": self.version, "config": self.fingerprint, "seed": c.seed},
            "operators": operator_versions(c.extract, c.image_filter, c.dedupe, c.image_captions, c.reorder,
                                           c.rewrite, *([c.dialog] if dialog is not None else [])),
            "provider": {"name": provider.name, "model": provider.model,
                         "prompts": {op.task: op.version for op in (c.image_captions, c.rewrite, c.dialog)}},
            "images": {"found": sum(1 for b in page.blocks if b.kind == "image"), "kept": used, "moved": moved},
            "title": rewritten["title"],
        }
        if dialog is not None:
            meta["dialog"] = dialog
        return Document(record, segments, meta)
