"""Task streams in plain PyTorch: offline data sources and deterministic stream builders."""

from task_streams.base import SCENARIOS, StreamInfo, Task, TaskStream
from task_streams.builders import build_stream, validate_stream_config
from task_streams.config import STREAM_BUILDERS, StreamConfig, register_stream

__all__ = [
    "SCENARIOS",
    "STREAM_BUILDERS",
    "StreamConfig",
    "StreamInfo",
    "Task",
    "TaskStream",
    "build_stream",
    "register_stream",
    "validate_stream_config",
]
