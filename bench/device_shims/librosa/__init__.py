"""A stand-in for librosa on the GPU machine only (bench/gpu_pending.sh puts this folder on
PYTHONPATH when librosa does not import there): librosa needs llvmlite, a 60 MB wheel, over what
reaches that offline machine. The benchmarks call librosa only to resample (the speech for the
mp4's AAC track), and librosa.resample's default (res_type="soxr_hq") is soxr.resample along the
last axis, which this does (soxr is carried as a wheel)."""
import numpy as np
import soxr


def resample(y, *, orig_sr, target_sr, **_):
    return soxr.resample(np.asarray(y).T, orig_sr, target_sr, quality="HQ").T
