"""LoRA tools: inspect, metadata, convert (torch-free), resize, merge, upload and compare.

The torch-free modules (inspect, metadata, convert, safetensors header reading) may be imported by the TUI;
resize, merge and compare need torch and run in CLI commands or jobs.
"""
