import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from conftest import jpeg_bytes, png_bytes, png_header_only
from tapestry.document import Document, ImageSegment, Limits, TextSegment, from_markup
from tapestry.errors import DocumentError
from tapestry.storage import (
    ImageRefused,
    decode_image,
    iter_documents,
    load_folder,
    save_folder,
    save_jsonl,
    save_shard,
    scan,
)


def sample_doc(photo, doc_id="s1"):
    grey = Image.new("RGB", (16, 8), (90, 90, 90))
    doc = from_markup("A [img1] floats above a [img2].", [photo, grey], id=doc_id, meta={"seed": 3})
    doc.segments.append(ImageSegment("target", name="out", width=32, height=32))
    doc.segments.append(TextSegment("an answer", role="target"))
    return doc


def pixels(segment):
    return np.asarray(segment.image)


def assert_same(a: Document, b: Document):
    strip = lambda d: [{k: v for k, v in s.items() if k != "src"} for s in d.to_dict()["segments"]]
    assert strip(a) == strip(b)
    assert a.id == b.id and a.meta == b.meta
    for x, y in zip(a.images(), b.images()):
        if x.image is None:
            assert y.image is None
        else:
            assert np.array_equal(pixels(x), pixels(y))


def test_folder_round_trip_keeps_pixels_and_jpeg_bytes(tmp_path, photo):
    doc = sample_doc(photo)
    jpeg = jpeg_bytes(photo)
    doc.segments[1].encoded = jpeg  # the original file's bytes are stored as they are
    doc.segments[1].image = decode_image(jpeg)
    save_folder(doc, tmp_path / "d")
    loaded = load_folder(tmp_path / "d")
    assert_same(doc, loaded)
    assert loaded.segments[1].src.endswith(".jpg") and loaded.segments[1].encoded == jpeg
    assert loaded.segments[2].src.endswith(".png")


def test_jsonl_and_shard_round_trip(tmp_path, photo):
    docs = [sample_doc(photo, f"s{k}") for k in range(3)]
    save_jsonl(docs, tmp_path / "m.jsonl")
    save_shard(docs, tmp_path / "s.tar")
    for path in (tmp_path / "m.jsonl", tmp_path / "s.tar"):
        loaded = list(iter_documents(path))
        assert [d.id for d in loaded] == ["s0", "s1", "s2"]
        for a, b in zip(docs, loaded):
            assert_same(a, b)
    # The shard is a plain webdataset shard: KEY.json + KEY.N.png
    names = tarfile.open(tmp_path / "s.tar").getnames()
    assert sorted(names[:3]) == ["00000000.0.png", "00000000.1.png", "00000000.json"]


def test_scan_walks_a_folder_tree_in_order(tmp_path, photo):
    save_folder(sample_doc(photo, "a"), tmp_path / "tree" / "a")
    save_shard([sample_doc(photo, "b")], tmp_path / "tree" / "b.tar")
    save_jsonl([sample_doc(photo, "c")], tmp_path / "tree" / "c" / "m.jsonl")
    ids = [loaded.document.id for loaded in scan(tmp_path / "tree")]
    assert sorted(ids) == ["a", "b", "c"]


class Boom(RuntimeError):
    pass


def test_crash_mid_write_leaves_old_folder_intact(tmp_path, photo, monkeypatch):
    save_folder(sample_doc(photo, "old"), tmp_path / "d")
    before = (tmp_path / "d" / "doc.json").read_bytes()
    import tapestry.storage as storage

    def exploding_dumps(*args, **kwargs):
        raise Boom("disk full")

    monkeypatch.setattr(storage.json, "dumps", exploding_dumps)
    with pytest.raises(Boom):
        save_folder(sample_doc(photo, "new"), tmp_path / "d")
    monkeypatch.undo()
    assert (tmp_path / "d" / "doc.json").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["d"]  # no temporaries left behind
    assert load_folder(tmp_path / "d").id == "old"


@pytest.mark.parametrize("kind", ["shard", "jsonl"])
def test_crash_mid_write_leaves_old_file_intact(tmp_path, photo, kind):
    path = tmp_path / ("x.tar" if kind == "shard" else "x.jsonl")
    save = save_shard if kind == "shard" else save_jsonl
    save([sample_doc(photo, "old")], path)
    before = path.read_bytes()

    def docs_then_crash():
        yield sample_doc(photo, "new1")
        raise Boom("killed")

    with pytest.raises(Boom):
        save(docs_then_crash(), path)
    assert path.read_bytes() == before
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    assert [d.id for d in iter_documents(path)] == ["old"]


def write_doc(folder, segments):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "doc.json").write_text(json.dumps({"id": "t", "segments": segments}))


@pytest.mark.parametrize(
    "src, reason",
    [
        ("../secret.png", "'..' would leave the document's folder"),
        ("images/../../secret.png", "'..' would leave the document's folder"),
        ("/etc/passwd", "absolute path '/etc/passwd' refused"),
        ("https://example.org/a.png", "remote images are not fetched"),
        ("missing.png", "image file 'missing.png' not found"),
    ],
)
def test_unsafe_paths_are_refused(tmp_path, photo, src, reason):
    (tmp_path / "secret.png").write_bytes(png_bytes(photo))
    write_doc(tmp_path / "d", [{"type": "text", "text": "<img:a/>"},
                               {"type": "image", "role": "reference", "name": "a", "src": src}])
    [loaded] = scan(tmp_path / "d")
    assert loaded.document is None
    [problem] = loaded.problems
    assert (problem.sample_id, problem.segment, problem.field) == ("t", 1, "src")
    assert reason in problem.reason


def test_symlink_escape_is_refused_but_inner_links_work(tmp_path, photo):
    (tmp_path / "outside.png").write_bytes(png_bytes(photo))
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "inner.png").write_bytes(png_bytes(photo))
    os.symlink(tmp_path / "outside.png", folder / "escape.png")
    os.symlink(folder / "inner.png", folder / "alias.png")
    write_doc(folder, [{"type": "image", "role": "context", "src": "escape.png"},
                       {"type": "image", "role": "context", "src": "alias.png"}])
    [loaded] = scan(folder)
    [problem] = loaded.problems
    assert problem.segment == 0 and "links outside the document's folder" in problem.reason


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "bomb.png").write_bytes(png_header_only(60_000, 60_000))
    write_doc(folder, [{"type": "image", "role": "context", "src": "bomb.png"}])
    [loaded] = scan(folder)
    [problem] = loaded.problems
    # PIL's own guard fires first at this size; either way it is refused with the pixel count.
    assert "decompression bomb refused" in problem.reason and "3600000000 pixels" in problem.reason
    with pytest.raises(ImageRefused, match="decompression bomb refused: 10000x10000 = 100,000,000 pixels"):
        decode_image(png_header_only(10_000, 10_000))
    # A lower configured limit refuses ordinary images too.
    with pytest.raises(ImageRefused, match="exceeds the limit of 100 pixels"):
        decode_image(png_bytes(Image.new("RGB", (20, 20))), Limits(max_pixels=100))


def test_corrupt_and_truncated_images_are_reported(tmp_path, photo):
    folder = tmp_path / "d"
    folder.mkdir()
    png = png_bytes(photo)
    jpeg = jpeg_bytes(photo)
    (folder / "trunc.png").write_bytes(png[: len(png) // 2])
    (folder / "trunc.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (folder / "noise.png").write_bytes(os.urandom(500))
    (folder / "good.png").write_bytes(png)
    write_doc(folder, [{"type": "image", "role": "context", "src": name}
                       for name in ("trunc.png", "trunc.jpg", "noise.png", "good.png")]
              + [{"type": "image", "role": "context", "src": "good.png", "width": 65}])
    [loaded] = scan(folder)
    got = [(p.segment, p.field, p.reason) for p in loaded.problems]
    assert [g[:2] for g in got] == [(0, "src"), (1, "src"), (2, "src"), (4, "width")]
    assert all("corrupt or truncated image" in g[2] for g in got[:3])
    assert "not an image file PIL can identify" in got[2][2]
    assert got[3][2] == "declared width 65 but the image is 64x64"


def test_shard_with_missing_member_and_garbage_shard(tmp_path, photo):
    path = tmp_path / "s.tar"
    save_shard([sample_doc(photo)], path)
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(tmp_path / "broken.tar", "w") as tar:
        for member, data in members:
            if member.name.endswith(".1.png"):
                continue
            import io
            tar.addfile(member, io.BytesIO(data))
    [loaded] = scan(tmp_path / "broken.tar")
    [problem] = loaded.problems
    assert problem.segment == 2 and "shard sample has no member '00000000.1.png'" in problem.reason
    (tmp_path / "garbage.tar").write_bytes(b"\x00\x01not a tar" * 100)
    results = list(scan(tmp_path / "garbage.tar"))
    assert results and all(r.problems for r in results)


def test_iter_documents_raises_with_location(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"id": "a", "segments": [{"type": "text", "text": "ok"}]}\n{"id": "b"}\n')
    with pytest.raises(DocumentError) as info:
        list(iter_documents(tmp_path / "m.jsonl"))
    assert str(info.value).startswith(f"{tmp_path / 'm.jsonl'}:2: sample 'b': segments: missing field 'segments'")
