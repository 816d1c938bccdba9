"""Downloads from Hugging Face, Civitai and plain URLs: resumable, verified, run as jobs.

`model` holds the shared types (what a source resolves to, progress, errors); `engine` fetches files
(httpx, `.part` + sidecar, Range/If-Range, retries, hash check, atomic rename); `sources` turns `hf:…`,
`civitai:…` and URLs into files to fetch; `job` is the worker (`python -m nyx_tui.downloads.job JOB_DIR`).
Import-light: httpx and huggingface_hub are imported by the modules that use them.
"""
