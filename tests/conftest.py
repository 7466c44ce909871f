"""The tests build the fused op in this checkout's build/ folder, never in ~/.cache/torch_extensions, which
other checkouts and Python environments share (subprocesses inherit the setting)."""
import os
from pathlib import Path

os.environ["TORCH_EXTENSIONS_DIR"] = str(Path(__file__).resolve().parents[1] / "build" / "torch_extensions")
