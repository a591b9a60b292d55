"""Our LoRA core, plain PyTorch (no transformers, gradio or peft).

    config = LoraConfig(rank=8, alpha=16, targets="all-linear", variant="dora")
    add_adapter(model, config, "mine")          # wraps the targeted layers, freezes the base
    set_active_adapters(model, {"mine": 1.0})   # or "mine", ["a", "b"], None for the base model
    merge_adapters(model); unmerge_adapters(model)
    save_adapter(model, "mine", "out/")         # peft layout: adapter_config.json + adapter_model.safetensors
    load_adapter(model, "out/", "again")
    export_merged(model, "merged/", tokenizer)  # a plain transformers folder
"""

from lora_app.lazy import exports

__getattr__, __all__ = exports(__name__, {
    "adapters": ("DeltaLoraAdapter", "DoraAdapter", "LoraAdapter", "LoraFAAdapter", "VeraAdapter", "VeraProjection"),
    "config": ("VARIANTS", "LoraConfig", "LoraConfigError"),
    "delta": ("DeltaLoraUpdater", "absorb"),
    "group": ("SAME_INPUT", "group_shared_inputs"),
    "io": ("AdapterLoadError", "adapter_state", "export_merged", "load_adapter", "merged_state_dict", "read_adapter",
           "save_adapter"),
    "layer": ("LoraLayer",),
    "model": ("adapter_config", "adapter_modules", "adapter_names", "add_adapter", "bypass_idle", "count_parameters",
              "is_merged", "lora_layers", "merge_adapters", "pack_adapters", "remove_adapter", "set_active_adapters",
              "set_trainable", "unmerge_adapters"),
    "optim": ("param_groups",),
    "targets": ("DEFAULT_TARGETS", "TargetError", "find_linear_modules", "resolve_targets"),
})
