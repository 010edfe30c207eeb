"""MMFS vs dense cross-attention over every pixel of every earlier image (DESIGN §12).

    python benchmarks/mmfs.py [--quick] [--threads N]

One LLM-side read at the paper's defaults: T = 64 query tokens of width D = 512, 16 heads,
3 levels of a 224-px image (28², 14², 7² = 1029 pixels per image), 8 points per level and head.
Images 1 → 32 at these fixed sizes. Both sides start from the images' projected values (and,
for dense, keys), which a generation context computes once per image and keeps; what is timed
is the per-step read: MMFS = offset/weight prediction + bilinear sampling (grows with
images × points), dense = softmax(QKᵀ)V over M·1029 keys (grows with images × pixels).

Figures: time_ratio_M (dense ÷ MMFS wall time) and memory_ratio_M (dense ÷ MMFS peak bytes of
tensors allocated during the read) for M in 1, 2, 4, 8, 16, 32; `time_ratio_32` has the target
(> 1: MMFS faster), and `time_ratio_growth` = time_ratio_32 ÷ time_ratio_1 (target > 1: the gap
grows with images).
"""

from __future__ import annotations

import sys
import weakref
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import figure, log, median_seconds, parse_args  # noqa: E402

BENCH = "mmfs"
IMAGES = (1, 2, 4, 8, 16, 32)
T, D, HEADS, POINTS, SIDES = 64, 512, 16, 8, (28, 14, 7)


class PeakTensorBytes:
    """Peak bytes of storages created by ops inside the block (inputs excluded), tracked with
    a dispatch mode: exact for CPU tensors, no allocator statistics needed."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker._see(out)
                return out

        self.mode = Mode()
        self.live: dict[int, int] = {}
        self.refs: dict[int, int] = {}
        self.current = self.peak = 0

    def _see(self, out) -> None:
        import torch

        outs = out if isinstance(out, (tuple, list)) else (out,)
        for t in outs:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in self.refs:
                self.refs[key] += 1
            else:
                if key in self.known:
                    continue
                self.refs[key] = 1
                self.live[key] = storage.nbytes()
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
            weakref.finalize(t, self._drop, key)

    def _drop(self, key: int) -> None:
        if key not in self.refs:
            return
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.current -= self.live.pop(key)
            del self.refs[key]

    def measure(self, fn, inputs) -> int:
        import torch

        self.known = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
        self.current = self.peak = 0
        with self.mode:
            result = fn()
        del result
        return self.peak


def setup(m: int):
    import torch

    from tapestry.models import family as families

    MMFS = families.get("mmi").benchmark_parts().MMFS
    torch.manual_seed(0)
    mod = MMFS(D, D, heads=HEADS, levels=len(SIDES), points=POINTS, max_images=32).eval()
    with torch.no_grad():
        mod.logits.weight.normal_(0, 0.02)
        mod.offsets.weight.normal_(0, 0.02)
    feats = [torch.randn(m, D, s, s) for s in SIDES]
    x = torch.randn(1, T, D)
    visible = torch.ones(1, T, m, dtype=torch.bool)
    with torch.no_grad():
        values = [v[None] for v in mod.values(feats)]  # cached per image
        tokens = torch.cat([f.flatten(2).transpose(1, 2) for f in feats], 1).reshape(1, -1, D)  # [1, M·1029, D]
        wk = torch.nn.Linear(D, D)
        wv = torch.nn.Linear(D, D)
        wq = torch.nn.Linear(D, D)
        wo = torch.nn.Linear(D, D, bias=False)
        keys = wk(tokens).view(1, -1, HEADS, D // HEADS).transpose(1, 2)  # cached per image
        vals = wv(tokens).view(1, -1, HEADS, D // HEADS).transpose(1, 2)
    per_image = sum(s * s for s in SIDES)
    key_visible = visible.repeat_interleave(per_image, dim=2)[:, None]  # [1, 1, T, M·1029]

    def sparse():
        with torch.no_grad():
            return mod(x, values, visible)

    def dense():
        with torch.no_grad():
            q = wq(x).view(1, T, HEADS, -1).transpose(1, 2)
            out = torch.nn.functional.scaled_dot_product_attention(q, keys, vals, attn_mask=key_visible)
            return wo(out.transpose(1, 2).reshape(1, T, D))

    inputs = [x, visible, key_visible, keys, vals, *values, *mod.parameters(), *wq.parameters(), *wo.parameters()]
    return sparse, dense, inputs


def main(argv=None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv, lambda p: p.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: torch's default); on a CPU shared with "
                                               "other jobs 1 thread measures steadier"))
    import torch

    torch.set_num_threads(args.threads or max(1, torch.get_num_threads()))
    repeats = 3 if args.quick else 10
    config = {"tokens": T, "dim": D, "heads": HEADS, "points": POINTS, "level_sides": list(SIDES),
              "repeats": repeats, "threads": torch.get_num_threads(), "device": "cpu"}
    ratios = {}
    for m in IMAGES:
        sparse, dense, inputs = setup(m)
        t_sparse = median_seconds(sparse, repeats)
        t_dense = median_seconds(dense, repeats)
        tracker = PeakTensorBytes()
        mem_sparse = tracker.measure(sparse, inputs)
        mem_dense = tracker.measure(dense, inputs)
        ratios[m] = t_dense / t_sparse
        log(f"{m:2d} images: MMFS {t_sparse * 1e3:7.2f} ms {mem_sparse / 2**20:7.1f} MiB | "
            f"dense {t_dense * 1e3:7.2f} ms {mem_dense / 2**20:7.1f} MiB")
        cfg = {**config, "images": m, "mmfs_ms": round(t_sparse * 1e3, 3), "dense_ms": round(t_dense * 1e3, 3),
               "mmfs_peak_mib": round(mem_sparse / 2**20, 3), "dense_peak_mib": round(mem_dense / 2**20, 3)}
        figure(BENCH, f"time_ratio_{m}", ratios[m], "x", 1.0 if m == 32 else None, True, cfg)
        figure(BENCH, f"memory_ratio_{m}", mem_dense / max(mem_sparse, 1), "x", None, True, cfg)
    figure(BENCH, "time_ratio_growth", ratios[32] / ratios[1], "x", 1.0, True,
           {**config, "time_ratio_1": round(ratios[1], 3), "time_ratio_32": round(ratios[32], 3)})


if __name__ == "__main__":
    main()
