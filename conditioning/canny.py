"""Canny edges with OpenCV alone (kept apart so worker processes import nothing else)."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from conditioning.images import resize, target_size


class CannyEdges:
    """cv2.Canny on the RGB image: at the output size (bit-identical to calling cv2.Canny on
    the same pixels), or at `detect_resolution` and then resized. Returns the HxW edge map."""

    def __init__(self, params: dict[str, Any]):
        self.low = params["low_threshold"]
        self.high = params["high_threshold"]
        self.detect_resolution = params["detect_resolution"]

    def __call__(self, rgb: np.ndarray, size: tuple[int, int], rel: str) -> np.ndarray:
        if self.detect_resolution is None:
            return cv2.Canny(resize(rgb, size), self.low, self.high)
        h, w = rgb.shape[:2]
        work = resize(rgb, target_size(w, h, self.detect_resolution))
        edges = cv2.Canny(work, self.low, self.high)
        return resize(edges, size, upscale=cv2.INTER_LINEAR)
