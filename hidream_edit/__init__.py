"""Shared library behind the HiDream-E1 NPU scripts: pipeline, model loading, images, editor."""
