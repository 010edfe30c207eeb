"""Web pages as ordered blocks of text and images (DuetGen §3, "the main body of each webpage is
converted into Markdown"): local HTML files, markdown files and WARC archives.

HTML goes through trafilatura (main-content extraction drops navigation, footers, sidebars and
most ad slots) into markdown with its images; markdown is split into blocks: headings,
paragraphs, and images (`![alt](src)`) in reading order. Image sources are resolved without the
network: a local file next to the page (never outside the page's folder), a `data:` URI, or in
a WARC the archived response for that URL. Anything else is a broken image.
"""

from __future__ import annotations

import base64
import binascii
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

from tapestry.data.operators.base import Rejected

PAGE_SUFFIXES = (".html", ".htm", ".xhtml", ".md", ".markdown", ".warc", ".warc.gz")
_IMAGE = re.compile(r"!\[(?P<alt>[^\]]*)\]\((?P<src>[^)\s]+)(?:\s+\"[^\"]*\")?\)")
_LINK = re.compile(r"(?<!!)\[([^\]]*)\]\([^)]*\)")


@dataclass
class Block:
    kind: str  # "heading", "text" or "image"
    text: str = ""  # heading or paragraph text; an image's alt text
    src: str = ""  # images: the source as written in the page

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "text": self.text, **({"src": self.src} if self.src else {})}


@dataclass
class Page:
    """One page: `name` for ids and logs, `url` as the page knew itself, `fetch(src)` -> bytes or
    None (not available), and the blocks in reading order."""

    name: str
    url: str
    title: str
    blocks: list[Block]
    fetch: Callable[[str], bytes | None] = field(repr=False, default=lambda src: None)
    sha256: str = ""
    dropped: list[tuple[str, str]] = field(default_factory=list)  # boilerplate removed: (kind, detail)


# Boilerplate around an article that is not its content: per kind, a pattern for class/id/role
# tokens of the element that holds it, and one for the heading that titles it. Comment threads
# are the one that hurts most: a reader's "Step 3 didn't work for me" reads like a step.
BOILERPLATE: dict[str, tuple[str, str]] = {
    "comments": (r"comments?|comment-list|commentlist|comment-respond|respond|disqus\w*|discussion|replies",
                 r"(\d+\s+)?(comments?|responses?|replies|leave a (reply|comment)|post a comment|join the discussion"
                 r"|discussion|what (do )?you think)"),
    "share-bar": (r"share|shares|sharing|share-?bar|share-?buttons|social(-share|-links|-icons)?|addthis\w*|sharethis"
                  r"|sharedaddy|a2a_kit", r"(share( this( post| article| page| recipe)?)?|spread the word)"),
    "newsletter": (r"newsletter\w*|subscribe\w*|subscription|sign-?up|mailing-?list|opt-?in|optin\w*|mc4wp\w*"
                   r"|mailchimp\w*", r"subscribe( to .*)?|sign up (for|to) .*|join our (mailing list|newsletter|list)|.*newsletter.*"),
    "author-bio": (r"author-?(bio|box|info|card|profile|description|about)|about-?(the-?)?author|bio-?box|byline-?bio"
                   r"|writer-?bio", r"(about the author|about me|written by .*|meet the author)"),
    "related-posts": (r"related\w*|yarpp\w*|jp-relatedposts|more-?(stories|posts|articles)|you-?may-?also-?like"
                      r"|also-?like|recommended\w*|read-?next|popular-?posts",
                      r"(related( posts| articles| stories| reading)?|you (may|might) also (like|enjoy)"
                      r"|more (from .*|stories|posts|articles)|read next|recommended( for you)?|popular posts)"),
}
_KEEP_TAGS = {"html", "body", "main", "article", "head"}


def _token_kind(tokens: list[str]) -> str | None:
    for kind, (token_pattern, _) in BOILERPLATE.items():
        # a token names the kind alone or as one part of a compound: "newsletter-signup"
        if any(re.search(rf"(^|-)(?:{token_pattern})(-|$)", t) for t in tokens):
            return kind
    return None


def _title_kind(text: str) -> str | None:
    text = re.sub(r"[\s:!.…]+$", "", re.sub(r"\s+", " ", text.strip().lower()))
    if not text or len(text) > 60:
        return None
    for kind, (_, title_pattern) in BOILERPLATE.items():
        if re.fullmatch(title_pattern, text):
            return kind
    return None


def strip_boilerplate(html: str) -> tuple[str, list[tuple[str, str]]]:
    """The page without comment threads, share bars, newsletter boxes, author bios and related
    posts, and what was removed as (kind, detail). An element is boilerplate when a class, id,
    role or aria-label token names the kind, or when it opens with a heading that does ("Related
    posts", "Leave a reply"). An element holding most of the page's text is never removed."""
    import lxml.html
    from lxml import etree

    try:
        root = lxml.html.document_fromstring(html)
    except (etree.ParserError, ValueError):
        return html, []
    total = max(1, len(root.text_content().strip()))
    dropped: list[tuple[str, str]] = []

    def remove(el, kind: str, why: str) -> None:
        chars = len(el.text_content().strip())
        if chars > total // 2:
            return
        dropped.append((kind, f"<{el.tag}> {why} ({chars} characters)"))
        el.drop_tree()

    for el in list(root.iter()):
        if not isinstance(el.tag, str) or el.tag in _KEEP_TAGS or el.getparent() is None:
            continue
        attrs = " ".join(el.get(a, "") for a in ("class", "id", "role", "aria-label"))
        tokens = [t for t in re.split(r"[\s_]+", attrs.lower()) if t]
        kind = _token_kind(tokens)
        if kind is not None and _attached(el, root):
            remove(el, kind, f"marked {' '.join(tokens)[:80]!r}")
    for heading in list(root.iter("h2", "h3", "h4", "h5", "h6")):
        if not _attached(heading, root):
            continue
        kind = _title_kind(heading.text_content())
        if kind is None:
            continue
        parent = heading.getparent()
        first_child = next((c for c in parent if isinstance(c.tag, str)), None)
        if parent.tag not in _KEEP_TAGS and first_child is heading:
            remove(parent, kind, f"titled {heading.text_content().strip()[:60]!r}")
            continue
        # the heading and what follows it, up to the next heading of the same or a higher level
        level = int(heading.tag[1])
        section = [heading]
        for sibling in heading.itersiblings():
            if isinstance(sibling.tag, str) and re.fullmatch(r"h[1-6]", sibling.tag) and int(sibling.tag[1]) <= level:
                break
            section.append(sibling)
        chars = sum(len(e.text_content().strip()) for e in section if isinstance(e.tag, str))
        if chars > total // 2:
            continue
        dropped.append((kind, f"<{heading.tag}> section titled {heading.text_content().strip()[:60]!r} "
                              f"({chars} characters)"))
        for e in section:
            e.drop_tree()
    if not dropped:
        return html, []
    return lxml.html.tostring(root, encoding="unicode"), dropped


def _attached(el, root) -> bool:
    while el is not None:
        if el is root:
            return True
        el = el.getparent()
    return False


def drop_boilerplate_blocks(blocks: list[Block]) -> tuple[list[Block], list[tuple[str, str]]]:
    """Markdown pages: a heading that titles boilerplate ("Comments", "Related posts") drops
    itself and the blocks up to the next heading."""
    kept: list[Block] = []
    dropped: list[tuple[str, str]] = []
    skipping: str | None = None
    for block in blocks:
        if block.kind == "heading":
            skipping = _title_kind(block.text)
            if skipping is not None:
                dropped.append((skipping, f"section titled {block.text[:60]!r}"))
                continue
        if skipping is None:
            kept.append(block)
    return kept, dropped


def markdown_blocks(markdown: str) -> list[Block]:
    """Headings, paragraphs and images in order; an image inside a paragraph splits it; links keep
    their text and lose their target."""
    blocks: list[Block] = []
    for chunk in re.split(r"\n\s*\n", markdown.replace("\r\n", "\n")):
        chunk = chunk.strip()
        if not chunk:
            continue
        heading = re.match(r"^(#{1,6})\s+(.*)$", chunk)
        if heading and "\n" not in chunk:
            blocks.append(Block("heading", _clean(heading.group(2))))
            continue
        cursor = 0
        for match in _IMAGE.finditer(chunk):
            before = _clean(chunk[cursor:match.start()])
            if before:
                blocks.append(Block("text", before))
            blocks.append(Block("image", match.group("alt").strip(), match.group("src").strip()))
            cursor = match.end()
        rest = _clean(chunk[cursor:])
        if rest:
            blocks.append(Block("text", rest))
    return blocks


def _clean(text: str) -> str:
    text = _LINK.sub(r"\1", text)
    text = re.sub(r"^\s*[-*+]\s+", "", text, flags=re.MULTILINE)  # list bullets
    text = re.sub(r"[*_`]{1,3}", "", text)
    return re.sub(r"\s+", " ", text).strip()


def decode_text(data: bytes) -> str:
    for encoding in ("utf-8", "cp1252"):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            continue
    return data.decode("latin-1")


def data_uri(src: str) -> bytes | None:
    """The bytes of a `data:image/...;base64,` URI (None when it is not one or is damaged)."""
    if not src.startswith("data:"):
        return None
    header, _, payload = src.partition(",")
    try:
        if header.endswith(";base64"):
            return base64.b64decode(payload, validate=False)
        return urllib.parse.unquote_to_bytes(payload)
    except (binascii.Error, ValueError):
        return None


def local_fetcher(folder: Path, max_bytes: int) -> Callable[[str], bytes | None]:
    root = folder.resolve()

    def fetch(src: str) -> bytes | None:
        inline = data_uri(src)
        if inline is not None or src.startswith("data:"):
            return inline
        parsed = urllib.parse.urlparse(src)
        if parsed.scheme or parsed.netloc:
            return None  # remote (or file:, ...): never fetched; a broken image here
        path = (root / urllib.parse.unquote(parsed.path).lstrip("/")).resolve()
        if root not in path.parents or not path.is_file() or path.stat().st_size > max_bytes:
            return None
        return path.read_bytes()

    return fetch


@dataclass(frozen=True)
class Extract:
    """Main-content extraction of HTML (trafilatura) and page reading."""

    name: ClassVar[str] = "extract"
    version: ClassVar[str] = "2"  # 2: boilerplate (comments, share bars, ...) removed and logged

    favor_recall: bool = True  # how-to pages: keep short step paragraphs trafilatura may judge thin
    min_text_chars: int = 80  # less main text than this: not a page worth keeping
    max_page_bytes: int = 8 << 20
    max_image_bytes: int = 16 << 20
    max_pages_per_warc: int = 10_000

    def html_page(self, name: str, url: str, html: str, fetch: Callable[[str], bytes | None], sha: str) -> Page:
        import trafilatura

        metadata = trafilatura.extract_metadata(html)
        html, dropped = strip_boilerplate(html)
        markdown = trafilatura.extract(html, output_format="markdown", include_images=True, include_links=False,
                                       include_tables=False, include_comments=False, favor_recall=self.favor_recall,
                                       url=url or None) or ""
        title = (metadata.title if metadata is not None and metadata.title else "") or ""
        blocks, more = drop_boilerplate_blocks(markdown_blocks(markdown))
        if not title:
            title = next((b.text for b in blocks if b.kind == "heading"), "")
        return Page(name, url, title.strip(), blocks, fetch, sha, dropped + more)

    def read(self, path: str) -> Iterator[Page]:
        """The pages of one input file; `Rejected` when the file cannot be read at all."""
        import hashlib

        lower = path.lower()
        if lower.endswith((".warc", ".warc.gz")):
            yield from self.read_warc(path)
            return
        try:
            size = Path(path).stat().st_size
            if size > self.max_page_bytes:
                raise Rejected("extract", "too-large", f"{size} bytes exceed the limit of {self.max_page_bytes}",
                               failure=True)
            data = Path(path).read_bytes()
        except OSError as e:
            raise Rejected("extract", "unreadable", str(e.strerror or e), failure=True) from None
        text = decode_text(data)
        sha = hashlib.sha256(data).hexdigest()
        fetch = local_fetcher(Path(path).parent, self.max_image_bytes)
        name = Path(path).stem
        if lower.endswith((".md", ".markdown")):
            blocks, dropped = drop_boilerplate_blocks(markdown_blocks(text))
            title = next((b.text for b in blocks if b.kind == "heading"), "")
            yield Page(name, "", title, blocks, fetch, sha, dropped)
        else:
            yield self.html_page(name, "", text, fetch, sha)

    def read_warc(self, path: str) -> Iterator[Page]:
        """HTML responses of a WARC as pages; image responses of the same archive are their images."""
        import hashlib

        from warcio.archiveiterator import ArchiveIterator
        from warcio.exceptions import ArchiveLoadFailed

        html: list[tuple[str, bytes]] = []
        images: dict[str, bytes] = {}
        records = 0
        try:
            if Path(path).stat().st_size == 0:
                raise Rejected("extract", "empty", "the file is empty", failure=True)
            with open(path, "rb") as stream:
                for record in ArchiveIterator(stream):
                    if not record.format.startswith("warc"):  # warcio's ARC fallback reads any junk
                        continue
                    records += 1
                    if record.rec_type != "response" or record.http_headers is None:
                        continue
                    status = record.http_headers.get_statuscode()
                    if not status or not status.startswith("2"):
                        continue
                    url = record.rec_headers.get_header("WARC-Target-URI") or ""
                    kind = (record.http_headers.get_header("Content-Type") or "").split(";")[0].strip().lower()
                    body = record.content_stream().read(self.max_page_bytes + 1)
                    if len(body) > self.max_page_bytes:
                        continue
                    if kind in ("text/html", "application/xhtml+xml") and len(html) < self.max_pages_per_warc:
                        html.append((url, body))
                    elif kind.startswith("image/"):
                        images[url] = body
        except (OSError, ArchiveLoadFailed, ValueError, EOFError) as e:
            if not html:
                raise Rejected("extract", "bad-warc", f"{type(e).__name__}: {e}"[:300], failure=True) from None
            # a truncated archive: keep the pages read before the damage
        if not records:
            raise Rejected("extract", "bad-warc", "no WARC record could be read from this file", failure=True)
        if not html:
            raise Rejected("extract", "no-pages", f"none of the archive's {records} record(s) is an HTML response")

        def fetcher(page_url: str) -> Callable[[str], bytes | None]:
            def fetch(src: str) -> bytes | None:
                inline = data_uri(src)
                if inline is not None or src.startswith("data:"):
                    return inline
                return images.get(urllib.parse.urljoin(page_url, src))

            return fetch

        stem = re.sub(r"\.warc(\.gz)?$", "", Path(path).name, flags=re.IGNORECASE)
        for k, (url, body) in enumerate(html):
            name = f"{stem}-{k:04d}"
            yield self.html_page(name, url, decode_text(body), fetcher(url), hashlib.sha256(body).hexdigest())
