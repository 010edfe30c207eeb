"""Static-pair filter by ORB keypoint matching (Inset §3.2, "dynamic state filtering": drop pairs
whose frames are too similar before asking a VLM whether anything changed).

Similarity is the share of keypoints that find a mutual best match in the other frame *at
nearly the same place*: a still scene scores near 1; moving objects or a moving camera lower it.
A pair with too few keypoints to judge is rejected as `featureless`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from tapestry.data.operators.base import Rejected
from tapestry.data.operators.video import Frame


@dataclass(frozen=True)
class OrbStatic:
    name: ClassVar[str] = "orb"
    version: ClassVar[str] = "1"

    n_features: int = 500
    max_similarity: float = 0.6  # above: the pair barely changed
    still_px: float = 2.0  # a matched keypoint that moved less than this (work-size px) is still
    max_hamming: int = 48  # descriptor distance above which a match is not trusted
    min_keypoints: int = 12

    def similarity(self, source: Frame, target: Frame) -> dict[str, float]:
        import cv2

        orb = cv2.ORB_create(nfeatures=self.n_features, fastThreshold=10, edgeThreshold=15, patchSize=15)
        kp_a, des_a = orb.detectAndCompute(source.work_gray, None)
        kp_b, des_b = orb.detectAndCompute(target.work_gray, None)
        n = min(len(kp_a), len(kp_b))
        if des_a is None or des_b is None or n == 0:
            return {"orb_keypoints": 0, "orb_similarity": 0.0}
        matcher = cv2.BFMatcher(cv2.NORM_HAMMING, crossCheck=True)
        matches = [m for m in matcher.match(des_a, des_b) if m.distance <= self.max_hamming]
        still = 0
        for m in matches:
            (xa, ya), (xb, yb) = kp_a[m.queryIdx].pt, kp_b[m.trainIdx].pt
            if (xa - xb) ** 2 + (ya - yb) ** 2 <= self.still_px ** 2:
                still += 1
        return {"orb_keypoints": int(n), "orb_similarity": round(still / n, 4)}

    def check(self, scores: dict[str, float], where: str = "") -> None:
        if scores["orb_keypoints"] < self.min_keypoints:
            raise Rejected(self.name, "featureless",
                           f"{where}{scores['orb_keypoints']} ORB keypoints < {self.min_keypoints}")
        if scores["orb_similarity"] > self.max_similarity:
            raise Rejected(self.name, "static-pair",
                           f"{where}ORB similarity {scores['orb_similarity']:.2f} > {self.max_similarity:g}")
