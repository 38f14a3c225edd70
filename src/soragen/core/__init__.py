"""Core: configs and their checks, errors, strict safetensors and JSON reading, atomic writes, the hub. Imports nothing else of soragen."""
