"""Taggers and captioners: WD14 (onnxruntime) and the BLIP family (transformers), run as jobs.

Import-light on purpose: onnxruntime, torch and transformers are imported inside the modules that use them,
which only job processes load.
"""
