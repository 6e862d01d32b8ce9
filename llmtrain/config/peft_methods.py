"""The peft methods `model.peft.method` names, and how the keys of `model.peft` map onto the
fields of each method's peft config class. Plain data: the config rules read it without
importing peft, and engine/peft.py builds the config from it.

Every method here merges into its base (`merge_and_unload`), so `final/` stays a plain
transformers model; methods that cannot merge (prompt and prefix tuning, ...) are not offered.
"""

from __future__ import annotations

# method -> (peft config class, {model.peft key: that class's field}). A common key missing
# from a method's map does not apply to it (OFT: its r and oft_block_size exclude each other,
# so both are options).
METHODS: dict[str, tuple[str, dict[str, str]]] = {
    "lora": ("LoraConfig", {"r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout"}),
    "dora": ("LoraConfig", {"r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout"}),
    "adalora": ("AdaLoraConfig", {"alpha": "lora_alpha", "dropout": "lora_dropout"}),
    "ia3": ("IA3Config", {}),
    "loha": ("LoHaConfig", {"r": "r", "alpha": "alpha"}),
    "lokr": ("LoKrConfig", {"r": "r", "alpha": "alpha"}),
    "oft": ("OFTConfig", {}),
    "vera": ("VeraConfig", {"r": "r", "dropout": "vera_dropout"}),
}

# model.peft keys that only AdaLoRA reads, by AdaLoraConfig's field name.
ADALORA_FIELDS = {
    "init_r": "init_r",
    "target_r": "target_r",
    "tinit": "tinit",
    "tfinal": "tfinal",
    "delta_t": "deltaT",
    "beta1": "beta1",
    "beta2": "beta2",
    "orth_reg_weight": "orth_reg_weight",
}

# LoRA/DoRA fields set from other keys of model.peft.
LORA_FIELDS = {"use_dora": "method", "use_rslora": "rslora", "init_lora_weights": "init"}

# Fields llmtrain sets itself for every method (never an option).
SET_BY_LLMTRAIN = {
    "task_type": "model.task",
    "target_modules": "model.peft.target_modules",
    "modules_to_save": "model.peft.modules_to_save",
    "inference_mode": "training",
    "total_step": "the run's optimizer steps",
    "rank_pattern": "the rank allocator",
}
# Bookkeeping fields of every peft config: not settings.
BOOKKEEPING = {"peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision"}


def owner_of(method: str, field: str) -> str | None:
    """The llmtrain key that sets peft field `field` for `method`, or None when it is free
    to set in `model.peft.options`."""
    _, common = METHODS[method]
    mapped = {v: f"model.peft.{k}" for k, v in common.items()}
    if method == "adalora":
        mapped |= {v: f"model.peft.{k}" for k, v in ADALORA_FIELDS.items()}
    if method in ("lora", "dora"):
        mapped |= {k: f"model.peft.{v}" for k, v in LORA_FIELDS.items()}
    return mapped.get(field) or SET_BY_LLMTRAIN.get(field)
