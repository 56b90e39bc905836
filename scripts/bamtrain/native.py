"""Native MoE folders: transformers' `mixtral` and `qwen3_moe` layouts, as `bam upcycle --format mixtral |
qwen3-moe` writes them (src/export/formats.ts), read into the BAM model and written back in the same
format (stock transformers loads them without remote code).

Both formats hold what a BAM folder with merged attention, a sequential block and llama-style layers
holds: the mapping is one table per format (python/native_formats.json, which src/arch/native.ts reads
too), tensor-name fragments and config keys, read left to right on load (to_bam_*) and right to left on
save (to_native_*), so the two directions and the two languages cannot drift apart.
The gate: Mixtral always renormalises the top-k weights (norm_topk_prob true); Qwen3-MoE says which in
its own norm_topk_prob, the same key as BAM's.
"""

import json
import os
import re

from . import PYTHON_DIR, BamTrainError

# BAM config values every native folder implies (the llama-style block of the formats' writer)
IMPLIED = dict(
    norm_type="rms",
    norm_bias=False,
    norm_unit_offset=False,
    second_norm=True,
    seed_parallel_block=False,
    gated_mlp=True,
    qkv_bias=False,
    attn_out_bias=False,
    mlp_bias=False,
    lm_head_bias=False,
    rope_style="half",
    learned_positions=False,
    embedding_scale=None,
    logit_scale=None,
    attention_scale=None,
    attention_experts="merged",
    block="sequential",
)
# config keys with the same name and meaning in BAM and both formats
SHARED_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "hidden_act",
    "rope_theta",
    "rope_scaling",
    "tie_word_embeddings",
    "num_experts_per_tok",
    "router_aux_loss_coef",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)

# python/native_formats.json: the table src/arch/native.ts reads too (tensor modules, config keys, required values)
with open(os.path.join(PYTHON_DIR, "native_formats.json")) as _file:
    SHARED = {fmt: spec for fmt, spec in json.load(_file).items() if fmt != "about"}


def _fragments(modules):
    """(BAM fragment, native fragment) per slot of the shared table; {e} is an expert index."""
    out = []
    for slot, module in modules.items():
        site, rest = slot.split(".", 1)
        bam = f".{site}.experts.{{e}}.{rest}." if "{e}" in module else f".{slot}."
        out.append((bam, f".{module}."))
    return out


def _format(fmt, keys, implied, defaults):
    shared = SHARED[fmt]
    keys = [
        ("norm_eps", "rms_norm_eps"),
        ("intermediate_size", shared["intermediate_key"]),
        ("num_experts", shared["experts_key"]),
        *keys,
    ]
    if shared["norm_topk_prob_key"] is None:  # the format always does what its default says
        implied = dict(implied, norm_topk_prob=shared["norm_topk_prob_default"])
    else:
        keys.append(("norm_topk_prob", shared["norm_topk_prob_key"]))
    return dict(
        tensors=_fragments(shared["modules"]),
        keys=keys,
        implied=implied,
        defaults=defaults,  # the config class's, for a config.json that leaves them out
        # native keys that must hold these values for the folder to be the BAM model
        required=shared["required"],
    )


FORMATS = {
    "mixtral": _format(
        "mixtral",
        keys=[("sliding_window", "sliding_window")],
        implied=dict(seed_model_type="mistral", qk_norm="none"),
        defaults=dict(rope_theta=1e6),
    ),
    "qwen3_moe": _format(
        "qwen3_moe",
        keys=[],
        implied=dict(seed_model_type="qwen3", qk_norm="shared", sliding_window=None),
        defaults=dict(rope_theta=10000.0),
    ),
}
NATIVE_DEFAULTS = dict(
    hidden_act="silu",
    rope_scaling=None,
    tie_word_embeddings=False,
    router_aux_loss_coef=0.001,
    sliding_window=None,
    norm_topk_prob=False,
)


def _patterns(fmt, forward):
    """[(compiled regex, replacement)] for BAM -> native (forward) or native -> BAM."""
    out = []
    for bam, native in FORMATS[fmt]["tensors"]:
        src, dst = (bam, native) if forward else (native, bam)
        regex = re.escape(src).replace(re.escape("{e}"), r"(\d+)")
        out.append((re.compile(regex), dst.replace("{e}", r"\1")))
    return out


def _rename(name, patterns):
    for regex, replacement in patterns:
        name = regex.sub(replacement, name, count=1)
    return name


def to_bam_state(fmt, state):
    patterns = _patterns(fmt, forward=False)
    return {_rename(k, patterns): v for k, v in state.items()}


def to_native_state(fmt, state):
    patterns = _patterns(fmt, forward=True)
    return {_rename(k, patterns): v for k, v in state.items()}


def _rope(fmt, native):
    """(rope_theta, rope_scaling) from a v4 config (rope_theta, rope_scaling) or a v5 one (rope_parameters)."""
    params = native.get("rope_parameters") or {}
    theta = native.get("rope_theta", params.get("rope_theta", FORMATS[fmt]["defaults"]["rope_theta"]))
    scaling = native.get("rope_scaling")
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    return theta, scaling


def to_bam_config(fmt, native, path):
    """The BAM config.json of a native folder's config; refuses (naming `path`) a folder BAM cannot hold."""
    spec = FORMATS[fmt]
    for key, want in spec["required"].items():
        if key in native and native[key] != want:
            raise BamTrainError(
                f"{path}: {key} is {native[key]!r}; finetune.py reads {fmt} folders with {key} "
                f"{want!r} (as `bam upcycle --format` writes them)"
            )
    if native.get("hidden_act", "silu") != "silu":
        raise BamTrainError(f"{path}: hidden_act is {native['hidden_act']!r}; the {fmt} layout BAM reads is SiLU")
    theta, scaling = _rope(fmt, native)
    config = dict(model_type="bam", **IMPLIED, **spec["implied"])
    for key in SHARED_KEYS:
        config[key] = native.get(key, NATIVE_DEFAULTS.get(key))
    config.update(rope_theta=theta, rope_scaling=scaling)
    for bam, key in spec["keys"]:
        config[bam] = native.get(key, NATIVE_DEFAULTS.get(key))
    if config["head_dim"] is None:
        config["head_dim"] = config["hidden_size"] // config["num_attention_heads"]
    if config["num_key_value_heads"] is None:
        config["num_key_value_heads"] = config["num_attention_heads"]
    config["rotary_dim"] = config["head_dim"]
    for key in ("dtype", "torch_dtype"):
        if key in native:
            config[key] = native[key]
    return config


def to_native_config(fmt, bam, native):
    """The native config.json to save: the source folder's (`native`) with every mapped key from the trained
    BAM config; keys the format has no place for (z-loss, jitter, dropout) stay in training.json."""
    out = dict(native)
    for key in SHARED_KEYS:
        if key in bam and (key in native or bam[key] != NATIVE_DEFAULTS.get(key)):
            out[key] = bam[key]
    if "rope_parameters" in native:  # v5 key: keep it in step with rope_theta
        out["rope_parameters"] = dict(native["rope_parameters"], rope_theta=bam["rope_theta"])
    for key, native_key in FORMATS[fmt]["keys"]:
        out[native_key] = bam[key]
    return out
