"""Optical flow: estimation (OpenCV DIS, RAFT) and warping, occlusion, chaining."""
