"""The dataset side: scanning folders of images and captions, tag operations, duplicates, quality, preprocessing.

Torch-free (the TUI imports it); anything that needs a model (tagging, captioning) lives in `nyx_tui.tagging`
and runs as a job.
"""
