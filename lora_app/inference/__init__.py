"""Generation with base models and adapters: chat, hot-swapped adapters, mixes, merged mode,
side-by-side comparison and export. Start with ``InferenceEngine`` (see ``engine``)."""

from lora_app.inference.base import BaseKey, LoadedBase
from lora_app.inference.cache import AdapterInfo
from lora_app.inference.compare import ComparisonResult
from lora_app.inference.devices import DeviceChoice, choose_device
from lora_app.inference.engine import DEFAULT_ADAPTER_BUDGET, InferenceEngine
from lora_app.errors import InferenceError
from lora_app.inference.export import push_to_hub, write_merged, zip_adapter
from lora_app.inference.modes import Mode
from lora_app.inference.settings import GenerationSettings
from lora_app.inference.streaming import Generation, GenerationStream

__all__ = [
    "AdapterInfo", "BaseKey", "ComparisonResult", "DEFAULT_ADAPTER_BUDGET", "DeviceChoice", "Generation",
    "GenerationSettings", "GenerationStream", "InferenceEngine", "InferenceError", "LoadedBase", "Mode",
    "choose_device", "push_to_hub", "write_merged", "zip_adapter",
]
