"""Hint images for ControlNet Condition: video frames -> per-frame control maps (F, 3, H, W) in 0..1.

Preprocessors:
  "none"       the frames already are hint maps (edges, depth, poses made elsewhere);
  "canny"      OpenCV Canny edges; options low_threshold (100), high_threshold (200); no weights;
  the controlnet-aux detectors below, whose weights the user keeps in an annotator folder (the files of
  the `lllyasviel/Annotators` model repository; ComfyUI's controlnet_aux nodes keep them under
  `ckpts/lllyasviel/Annotators`). Nothing is ever downloaded: a missing folder or file is an error.

  | preprocessor | controlnet-aux detector | files expected in the annotator folder |
  |---|---|---|
  | depth        | MidasDetector (DPT-Hybrid)   | dpt_hybrid-midas-501f0c75.pt |
  | depth_zoe    | ZoeDetector (ZoeD-M12-N)     | ZoeD_M12_N.pt |
  | hed          | HEDdetector                  | ControlNetHED.pth |
  | lineart      | LineartDetector              | sk_model.pth, sk_model2.pth (coarse=True uses the second) |
  | openpose     | OpenposeDetector             | body_pose_model.pth, hand_pose_model.pth, facenet.pth |

controlnet-aux's `from_pretrained(path)` reads `path/<file>` when `path` is a folder and asks the Hub when it is
not (MiDaS even fetches a missing file itself), so the folder and every file are checked here first and the
Hub is forced offline while the detector loads.

Detector options: annotator_dir (required), device ("cpu"), detect_resolution (512: the short side the
detector works at), plus the detector's own keywords (openpose include_hand/include_face, lineart coarse,
hed safe/scribble). Every hint map is returned at the frames' own size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from ..video.frames import check_image_batch


@dataclass(frozen=True)
class Annotator:
    module: str  # controlnet-aux submodule
    detector: str  # class with a `from_pretrained(folder)` and a `__call__(uint8 HWC image)`
    files: tuple  # weight files `from_pretrained` reads from the folder


ANNOTATORS: dict[str, Annotator] = {
    "depth": Annotator("controlnet_aux.midas", "MidasDetector", ("dpt_hybrid-midas-501f0c75.pt",)),
    "depth_zoe": Annotator("controlnet_aux.zoe", "ZoeDetector", ("ZoeD_M12_N.pt",)),
    "hed": Annotator("controlnet_aux.hed", "HEDdetector", ("ControlNetHED.pth",)),
    "lineart": Annotator("controlnet_aux.lineart", "LineartDetector", ("sk_model.pth", "sk_model2.pth")),
    "openpose": Annotator(
        "controlnet_aux.open_pose", "OpenposeDetector", ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth")
    ),
}
PREPROCESSORS = ("none", "canny") + tuple(ANNOTATORS)


# --- frames <-> images --------------------------------------------------------------------------------

def to_uint8(frame: torch.Tensor) -> np.ndarray:
    """One IMAGE frame (H, W, 3) in 0..1 -> uint8 RGB array, what OpenCV and the detectors read."""
    return (frame.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def from_uint8(image: np.ndarray, size: tuple) -> torch.Tensor:
    """A detector's uint8 map (h, w[, c]) -> (3, H, W) float 0..1 at `size` = (H, W)."""
    import cv2

    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.shape[:2] != tuple(size):
        image = cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    return torch.from_numpy(np.ascontiguousarray(image[:, :, :3])).permute(2, 0, 1).float() / 255


# --- the preprocessors ----------------------------------------------------------------------------------

def canny(frame: np.ndarray, low_threshold: int = 100, high_threshold: int = 200) -> np.ndarray:
    """Binary Canny edge map (0 or 255) of an RGB uint8 frame."""
    import cv2

    if not 0 <= low_threshold <= high_threshold:
        raise ValueError(f"canny thresholds must satisfy 0 <= low <= high (got {low_threshold}, {high_threshold})")
    return cv2.Canny(frame, low_threshold, high_threshold)


def annotator_files(preprocessor: str, annotator_dir: Optional[str]) -> list[str]:
    """Paths of the weight files `preprocessor` needs; a one-line error naming file and folder if any is missing."""
    spec = ANNOTATORS[preprocessor]
    wanted = ", ".join(spec.files)
    if not annotator_dir:
        raise FileNotFoundError(
            f"preprocessor '{preprocessor}' needs an annotator folder holding {wanted}: set annotator_dir"
        )
    if not os.path.isdir(annotator_dir):
        raise FileNotFoundError(
            f"annotator folder '{annotator_dir}' does not exist: preprocessor '{preprocessor}' expects {wanted} in it"
        )
    paths = [os.path.join(annotator_dir, name) for name in spec.files]
    missing = [os.path.basename(p) for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"preprocessor '{preprocessor}' expects {', '.join(missing)} in annotator folder '{annotator_dir}': "
            "copy it there from lllyasviel/Annotators (nothing is downloaded)"
        )
    return paths


def load_annotator(preprocessor: str, annotator_dir: Optional[str], device: str = "cpu"):
    """A controlnet-aux detector built from local weights only (files checked first, Hub forced offline)."""
    import importlib

    from .single_file import hub_offline

    annotator_files(preprocessor, annotator_dir)
    spec = ANNOTATORS[preprocessor]
    detector_cls = getattr(importlib.import_module(spec.module), spec.detector)
    with hub_offline():  # a local folder never reaches the Hub; this makes sure of it
        detector = detector_cls.from_pretrained(annotator_dir)
    return detector.to(device)


def make_hints(
    frames: torch.Tensor,
    preprocessor: str = "none",
    *,
    annotator_dir: Optional[str] = None,
    device: str = "cpu",
    detect_resolution: int = 512,
    low_threshold: int = 100,
    high_threshold: int = 200,
    progress: Optional[Callable[[int, int], None]] = None,
    **detector_options,
) -> torch.Tensor:
    """ComfyUI IMAGE (F, H, W, 3) -> hint maps (F, 3, H, W) in 0..1 on the CPU, at the frames' size."""
    check_image_batch(frames, "ControlNet Condition's frames")
    if preprocessor not in PREPROCESSORS:
        raise ValueError(f"unknown preprocessor {preprocessor!r}; choose one of {', '.join(PREPROCESSORS)}")
    if preprocessor == "none":
        return frames.detach().float().cpu().clamp(0, 1).permute(0, 3, 1, 2).contiguous()
    size = tuple(frames.shape[1:3])
    if preprocessor == "canny":
        def detect(image):
            return canny(image, low_threshold, high_threshold)
    else:
        detector = load_annotator(preprocessor, annotator_dir, device)

        def detect(image):
            # image_resolution = detect_resolution: one resize back to the frame size, done here.
            return detector(image, detect_resolution=detect_resolution, image_resolution=detect_resolution,
                            output_type="np", **detector_options)

    hints = []
    with torch.no_grad():
        for f in range(frames.shape[0]):
            hints.append(from_uint8(detect(to_uint8(frames[f])), size))
            if progress is not None:
                progress(f + 1, frames.shape[0])
    return torch.stack(hints)
