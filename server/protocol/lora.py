"""vLLM's POST /v1/load_lora_adapter and /v1/unload_lora_adapter bodies (not OpenAI's)."""

from __future__ import annotations

from pydantic import Field

from server.protocol.base import OpenAIBaseModel


class LoadLoraAdapterRequest(OpenAIBaseModel):
    lora_name: str = Field(min_length=1, max_length=256)  # what requests name as `model`
    lora_path: str = Field(min_length=1, max_length=4096)  # a folder, or a hub id


class UnloadLoraAdapterRequest(OpenAIBaseModel):
    lora_name: str = Field(min_length=1, max_length=256)
    lora_int_id: int | None = None  # vLLM's, unused: adapters are known by name here
