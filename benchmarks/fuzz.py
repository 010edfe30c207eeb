"""Fuzzing every input surface: hostile input must end in tapestry's own error (one message
naming the problem) or be accepted, never in another exception.

    python benchmarks/fuzz.py            # >= 1000 cases per surface
    python benchmarks/fuzz.py --quick    # 200 per surface
    python benchmarks/fuzz.py --surface image_bytes --cases 5000

Per surface, four JSON lines (benchmarks/_common.py's convention): SURFACE_cases,
SURFACE_clear_errors (a TapestryError with a message, or a loader's problem list),
SURFACE_accepted and SURFACE_unexpected (target 0; the first few are printed to stderr with the
input). Cases come from hypothesis strategies, seeded, so a run is reproducible. The test suite
runs every surface with a few dozen cases (tests/test_fuzz.py).
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
import tempfile
import traceback
import zlib
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from tapestry.errors import TapestryError  # noqa: E402

# ------------------------------------------------------------------ strategies
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
segment_like = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image", "video", 3])},
    optional={
        "text": st.text(alphabet="ab [img12]<:/>x-\n", max_size=30) | json_values,
        "role": st.sampled_from(["reference", "context", "target", "hero", None]),
        "name": st.sampled_from(["a", "b", "-x", "", None]) | st.text(max_size=5),
        "src": st.sampled_from(["a.png", "../x.png", "/etc/passwd", "", 7, "images/0.png", "C:\\x.png"]),
        "width": st.integers(-5, 20000) | json_values,
        "height": st.integers(-5, 1 << 40) | json_values,
        "meta": json_values,
    },
)
document_like = st.fixed_dictionaries(
    {}, optional={"id": st.text(max_size=10) | json_values,
                  "segments": st.lists(segment_like, max_size=6) | json_values,
                  "meta": json_values, "extra": json_values})
MARKUP_PIECES = list("[img]<:/>0123456789 abc_.-\n") + ["[img", "<img:", "/>", "[img1]", "<img:img2/>", "\\[img1]"]


def _png_header_only(width: int, height: int, colour_type: int = 2) -> bytes:
    """A PNG whose header claims width × height (a decompression bomb to a trusting loader)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        import struct

        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)

    import struct

    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + chunk(b"IEND", b"")


def _encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _image_seeds() -> list[bytes]:
    base = Image.new("RGB", (24, 16), (200, 30, 30))
    frames = [Image.new("RGB", (12, 12), (i * 60, 0, 0)) for i in range(3)]
    return [
        _encoded(base, "PNG"), _encoded(base, "JPEG"), _encoded(base.convert("RGBA"), "PNG"),
        _encoded(base.convert("P"), "PNG"), _encoded(base.convert("CMYK"), "JPEG"),  # CMYK
        _encoded(base.convert("L"), "PNG"), _encoded(base.convert("LA"), "PNG"), _encoded(base.convert("1"), "PNG"),
        _encoded(base.convert("I;16"), "PNG"), _encoded(base.convert("F"), "TIFF"), _encoded(base, "BMP"),
        _encoded(base, "WEBP"), _encoded(base.convert("CMYK"), "TIFF"),
        _encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0),  # animated
        _encoded(frames[0], "PNG", save_all=True, append_images=frames[1:]),  # APNG
        _encoded(frames[0], "WEBP", save_all=True, append_images=frames[1:]),
        _png_header_only(100_000, 100_000), _png_header_only(1, 2 ** 31 - 1), _png_header_only(0, 0),
        _png_header_only(40_000, 40_000, colour_type=6),
    ]


@st.composite
def mangled(draw, seeds: list[bytes]):
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, 6))):
        action = draw(st.sampled_from(["flip", "cut", "insert"]))
        position = draw(st.integers(0, max(0, len(data) - 1)))
        if action == "flip" and data:
            data[position] ^= draw(st.integers(1, 255))
        elif action == "cut":
            del data[position:]  # truncated
        else:
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


# ------------------------------------------------------------------ outcomes
class Unexpected(Exception):
    """A surface's check saw something wrong that is not an exception (a non-RGB image)."""


def classify(check: Callable[[Any], str], case: Any) -> tuple[str, str | None]:
    try:
        outcome = check(case)
    except TapestryError as e:
        if not str(e).strip():
            return "unexpected", "TapestryError without a message"
        return "clear", None
    except Exception as e:  # noqa: BLE001 - counting these is the point
        return "unexpected", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=-3)}"
    return outcome, None


# ------------------------------------------------------------------ surfaces
_work = Path(tempfile.mkdtemp(prefix="tapestry-fuzz-"))


def check_document_json(raw: bytes) -> str:
    from tapestry.document import Document

    Document.from_json(raw)
    return "accepted"


def check_markup(case: tuple[str, int]) -> str:
    from tapestry.document import from_markup

    text, n_images = case
    from_markup(text, [Image.new("RGB", (2, 2))] * n_images)
    return "accepted"


def check_image_bytes(data: bytes) -> str:
    from tapestry.document import Limits
    from tapestry.storage import decode_image

    image = decode_image(data, Limits(max_pixels=4_000_000))
    if image.mode != "RGB" or image.width < 1 or image.height < 1:
        raise Unexpected(f"decode_image returned mode {image.mode} size {image.size}")
    return "accepted"


def _scan_outcome(path: Path, limits=None) -> str:
    from tapestry.document import Limits
    from tapestry.storage import scan

    problems = 0
    for loaded in scan(path, limits or Limits()):
        if loaded.document is None and not loaded.problems:
            raise Unexpected(f"{loaded.source}: neither a document nor a problem")
        problems += bool(loaded.problems)
        for problem in loaded.problems:
            if not str(problem).strip():
                raise Unexpected("a problem without a message")
    return "clear" if problems else "accepted"


SHARD_NAMES = ["00000000.json", "00000000.0.png", "00000001.json", "00000001.0.jpg", "../evil.json",
               "/abs/00000002.json", "a/../../00000003.json", "dir/00000004.json", "00000005.0.png",
               "x.y.z.json", ".json", "00000006", "00000000.json",  # a duplicate key
               "\udcff\udcfe.json", "caf\udce9.0.png", "00000007.json"]


@st.composite
def shard_members(draw):
    good = json.dumps({"id": "d", "segments": [{"type": "text", "text": "a "}, {"type": "image", "src": "0.png"}]})
    contents = st.sampled_from([good.encode(), b"{", b"", b"\xff\xfe", json.dumps({"id": 1}).encode(),
                                _encoded(Image.new("RGB", (4, 4)), "PNG"), b"\x00" * 5000])  # 5000 > the limit
    members = draw(st.lists(st.tuples(st.sampled_from(SHARD_NAMES) | st.text(max_size=12),
                                      contents | st.binary(max_size=64),
                                      st.sampled_from(["file", "file", "file", "dir", "symlink"])), max_size=8))
    return members


def check_webdataset_shard(members) -> str:
    from tapestry.document import Limits

    path = _work / "fuzz.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape") as tar:
        for name, data, kind in members:
            info = tarfile.TarInfo(name or "x")
            if kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return _scan_outcome(path, Limits(max_image_bytes=4096))


JSONL_LINES = [
    json.dumps({"id": "a", "segments": [{"type": "text", "text": "hello"}]}).encode(),
    json.dumps({"id": "b", "segments": [{"type": "image", "src": "../../etc/passwd"}]}).encode(),
    json.dumps({"id": "c", "segments": [{"type": "image", "src": "/etc/hostname"}]}).encode(),
    json.dumps({"id": "d", "segments": [{"type": "image", "src": "nowhere.png"}]}).encode(),
    b"{", b"", b"[]", b"null", b"\xef\xbb\xbf{\"id\": \"bom\", \"segments\": []}", b"\xff\xfe\x00",
    b"{\"id\": \"" + b"x" * 3000 + b"\"}", b"1e999", b"{\"id\": \"e\", \"segments\": [], \"id\": \"f\"}",
]


def check_jsonl_manifest(lines: list[bytes]) -> str:
    path = _work / "fuzz.jsonl"
    path.write_bytes(b"\n".join(lines))
    return _scan_outcome(path)


_TOML_BASE = (ROOT / "configs" / "test-tiny.toml").read_text(encoding="utf-8")
SET_KEYS = ["optim.lr", "seed", "stages.0.steps", "stages.9.steps", "model.llm.hidden_size", "layout.target_size",
            "data.shards", "parallel.mode", "model", "nothing.here", "", "ema.decay", "model.vae", "stages"]
SET_VALUES = ["1e-3", "abc", "-1", "0", "[1, 2", "[32, 32]", "true", "\"x\"", "", "nan", "inf", "1" * 400,
              "{a = 1}", "[[1]]", "99999999999999999999999"]


@st.composite
def toml_cases(draw):
    lines = _TOML_BASE.splitlines()
    for _ in range(draw(st.integers(0, 4))):
        action = draw(st.sampled_from(["drop", "dup", "garble", "retype"]))
        k = draw(st.integers(0, max(0, len(lines) - 1)))
        if not lines:
            break
        if action == "drop":
            del lines[k]
        elif action == "dup":
            lines.insert(k, lines[k])
        elif action == "garble":
            lines[k] = lines[k][: draw(st.integers(0, len(lines[k])))] + draw(st.text(alphabet="=[]\"'.#x1 ", max_size=6))
        elif "=" in lines[k]:
            key = lines[k].split("=", 1)[0]
            lines[k] = f"{key}= {draw(st.sampled_from(SET_VALUES))}"
    sets = draw(st.lists(st.tuples(st.sampled_from(SET_KEYS), st.sampled_from(SET_VALUES)).map(lambda kv: f"{kv[0]}={kv[1]}")
                         | st.text(max_size=12), max_size=3))
    return "\n".join(lines), sets, draw(st.booleans())


def check_toml_config(case) -> str:
    from tapestry.data.pipelines import build_config
    from tapestry.train.config import load_config

    text, sets, data_engine = case
    if data_engine:  # `tapestry data ... --set KEY=VALUE` goes through its own reader
        build_config("web-howto", overrides=sets)
        return "accepted"
    path = _work / "fuzz.toml"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    load_config(path, sets)
    return "accepted"


def _pipeline_record() -> dict:
    from tapestry.models.pipeline_folder import resolve_checkpoint

    return json.loads((resolve_checkpoint("default") / "pipeline.json").read_text())


def _family_record(name: str) -> dict:
    """A family's model config.json, made through the registry (benchmarks import no family)."""
    from tapestry.models import family as families

    family = families.get(name)
    return family.model_config(family.recipe(), 512, 4).to_dict()


CHECKPOINT_JSON_KINDS = ["pipeline", "mot", "duet", "mmi", "toy_ae", "flux_params"]


@st.composite
def checkpoint_json_cases(draw):
    """A pipeline.json, a config.json of a model (every built-in family) or an autoencoder,
    mutated field by field."""
    from tapestry.models.vae.toy import ToyAEConfig

    which = draw(st.sampled_from(CHECKPOINT_JSON_KINDS))
    if which == "pipeline":
        record = _pipeline_record()
    elif which in ("mot", "duet", "mmi"):
        record = _family_record(which)
    elif which == "toy_ae":
        record = ToyAEConfig().to_dict()
    else:
        record = {"resolution": 256, "in_channels": 3, "ch": 32, "out_ch": 3, "ch_mult": [1, 2], "num_res_blocks": 1,
                  "z_channels": 4, "scale_factor": 0.5, "shift_factor": 0.1}
    for _ in range(draw(st.integers(0, 3))):
        paths = _paths(record)
        if not paths:
            break
        where = draw(st.sampled_from(paths))
        action = draw(st.sampled_from(["drop", "retype", "extra"]))
        _mutate(record, where, action, draw(json_values | st.sampled_from([0, -1, 1 << 40, 1.5, "8", [1], None])))
    text = json.dumps(record)
    if draw(st.integers(0, 9)) == 0:
        text = text[: draw(st.integers(0, len(text)))]  # truncated
    return which, text


def _paths(obj, prefix=()) -> list[tuple]:
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.append(prefix + (k,))
            out += _paths(v, prefix + (k,))
    return out


def _mutate(record, path, action, value) -> None:
    parent = record
    for k in path[:-1]:
        parent = parent[k]
    if not isinstance(parent, dict) or path[-1] not in parent:
        return
    if action == "drop":
        del parent[path[-1]]
    elif action == "retype":
        parent[path[-1]] = value
    else:
        parent[f"{path[-1]}_extra"] = value


def check_checkpoint_json(case) -> str:
    from tapestry.models import family as families
    from tapestry.models.vae.flux import FluxAEParams
    from tapestry.models.vae.toy import ToyAEConfig

    which, text = case
    folder = _work / "ckpt"
    folder.mkdir(exist_ok=True)
    if which == "pipeline":
        from tapestry.models.pipeline_folder import read_pipeline_record

        (folder / "pipeline.json").write_text(text)
        read_pipeline_record(folder)
    elif which in ("mot", "duet", "mmi"):
        (folder / "config.json").write_text(text)
        families.get(which).load_config(folder)
    elif which == "toy_ae":
        (folder / "config.json").write_text(text)
        ToyAEConfig.load(folder / "config.json")
    else:
        (folder / "ae_params.json").write_text(text)
        FluxAEParams.load(folder / "ae_params.json").validate()
    return "accepted"


def _safetensors_seed() -> bytes:
    import torch
    from safetensors.torch import save

    return save({"a": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(2, dtype=torch.bfloat16)})


def check_safetensors(data: bytes) -> str:
    from tapestry.models.common.checkpoint import load_safetensors

    path = _work / "model.safetensors"
    path.write_bytes(data)
    load_safetensors(path)
    return "accepted"


def surfaces() -> dict[str, tuple[Any, Callable[[Any], str]]]:
    from hypothesis import strategies as st

    return {
        "document_json": (st.binary(max_size=300) | (json_values | document_like).map(lambda o: json.dumps(o).encode()),
                          check_document_json),
        "markup": (st.tuples(st.lists(st.sampled_from(MARKUP_PIECES), max_size=25).map("".join), st.integers(0, 3)),
                   check_markup),
        "image_bytes": (mangled(_image_seeds()) | st.binary(max_size=200), check_image_bytes),
        "webdataset_shard": (shard_members(), check_webdataset_shard),
        "jsonl_manifest": (st.lists(st.sampled_from(JSONL_LINES) | st.binary(max_size=40), max_size=6), check_jsonl_manifest),
        "toml_config": (toml_cases(), check_toml_config),
        "checkpoint_json": (checkpoint_json_cases(), check_checkpoint_json),
        "safetensors": (mangled([_safetensors_seed()]) | st.binary(max_size=64), check_safetensors),
    }


def run_surface(name: str, cases: int, random_seed: int = 0, show: int = 3) -> dict[str, Any]:
    """Run `cases` hypothesis cases against one surface; returns the counts and the first
    `show` unexpected exceptions (with their input)."""
    strategy, check = surfaces()[name]
    counts: Counter = Counter()
    examples: list[str] = []

    @seed(random_seed)
    @settings(max_examples=cases, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def body(case):
        outcome, detail = classify(check, case)
        counts[outcome] += 1
        if detail is not None and len(examples) < show:
            examples.append(f"{name}: input {case!r:.300}\n{detail}")

    body()
    return {"cases": sum(counts.values()), "clear_errors": counts["clear"], "accepted": counts["accepted"],
            "unexpected": counts["unexpected"], "examples": examples}


def main(argv: list[str] | None = None) -> int:
    from _common import figure, parse_args

    args = parse_args(__doc__.splitlines()[0], argv, extra=lambda p: (
        p.add_argument("--cases", type=int, default=None, help="cases per surface (default 1000, --quick 200)"),
        p.add_argument("--surface", action="append", default=None, help="only this surface (repeatable)"),
        p.add_argument("--seed", type=int, default=0)))
    cases = args.cases or (200 if args.quick else 1000)
    names = args.surface or list(surfaces())
    unexpected = 0
    for name in names:
        result = run_surface(name, cases, args.seed)
        config = {"cases_asked": cases, "seed": args.seed, "quick": args.quick}
        figure("fuzz", f"{name}_cases", result["cases"], "cases", None, True, config)
        figure("fuzz", f"{name}_clear_errors", result["clear_errors"], "cases", None, True, config)
        figure("fuzz", f"{name}_accepted", result["accepted"], "cases", None, True, config)
        figure("fuzz", f"{name}_unexpected", result["unexpected"], "cases", 0, False, config)
        for example in result["examples"]:
            print(example, file=sys.stderr)
        unexpected += result["unexpected"]
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
