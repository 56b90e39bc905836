"""Synthetic seeds and the BAM folder built from them, in Python (no Node on the GPU machine).

E random dense llama seeds of one shape are mixed as `bam upcycle` mixes them (docs/method.md): expert e's
attention and FFN are seed e's tensors, embeddings / norms / lm_head are the seeds' average, routers are
new (normal, std sqrt(0.1 / hidden): Switch's 0.1 of the fan-in scale). Seed e's tensor `name` is drawn
from a generator seeded by (seed, e, name), so the BAM folder and the dense seed-0 folder share seed 0's
tensors exactly, without ever holding all seeds in memory.

write_native turns a BAM folder of the BTX layout into the native Mixtral / Qwen3-MoE folder that
`bam upcycle --format mixtral | qwen3-moe` writes: the same tensors under the names and config keys of
scripts/bamtrain/native.py's table (the one finetune.py reads and writes those folders with).
"""

import hashlib
import json
import os
import shutil

import torch

from bamtrain import folder, native

# The benchmark shape: a small llama (24 layers, hidden 1024, 16 heads, FFN 2816, vocab 32000): about
# 0.37B parameters per seed, 1.3B in the 4-expert BAM model (0.64B active per token).
SEED_SHAPE = dict(
    seed_model_type="llama",
    vocab_size=32000,
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=24,
    num_attention_heads=16,
    num_key_value_heads=16,
    head_dim=64,
    max_position_embeddings=4096,
    norm_type="rms",
    norm_eps=1e-5,
    second_norm=True,
    hidden_act="silu",
    gated_mlp=True,
    rope_theta=10000.0,
    rope_style="half",
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)
TINY_SHAPE = dict(
    SEED_SHAPE,
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
)
# A llama-like 1B (TinyLlama 1.1B's shape: 22 layers, hidden 2048, 32 heads of 64, 4 key/value heads, FFN
# 5632, vocab 32000): 1.10B parameters per seed, 3.4B in the 4-expert BTX model, 4.0B in the soft-MoA one.
LARGE_SHAPE = dict(
    SEED_SHAPE,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
)
SHAPES = {"base": SEED_SHAPE, "1b": LARGE_SHAPE}
# The seed family Qwen3-MoE holds: a llama block with RMS norms on queries and keys (one weight per head_dim)
QWEN3_SEEDS = dict(seed_model_type="qwen3", qk_norm="shared")
MOE = dict(num_experts=4, num_experts_per_tok=1, attention_experts="moa", block="parallel")
DENSE = dict(num_experts=1, num_experts_per_tok=1, attention_experts="merged", block="sequential")
# BTX mode: FFN experts only, the seeds' attention averaged, sequential block, the chosen experts' weights
# renormalised: the model the native formats hold (docs/format.md, "Native formats")
BTX = dict(num_experts=4, num_experts_per_tok=1, attention_experts="merged", block="sequential", norm_topk_prob=True)
# config.json keys of a native folder that native.to_native_config does not take from the BAM config
NATIVE_BASE = {
    # transformers' Mixtral always renormalises; the key says so in the folder, as the CLI writes it
    "mixtral": dict(model_type="mixtral", architectures=["MixtralForCausalLM"], norm_topk_prob=True),
    "qwen3_moe": dict(
        model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], **native.FORMATS["qwen3_moe"]["required"]
    ),
}


def bam_config(shape, moe):
    c = dict(
        model_type="bam",
        architectures=["BamForCausalLM"],
        auto_map={"AutoConfig": "configuration_bam.BamConfig", "AutoModelForCausalLM": "modeling_bam.BamForCausalLM"},
    )
    c.update(shape)
    c.update(
        moe,
        router_aux_loss_coef=0.01,
        router_z_loss_coef=0.001,
        dtype="bfloat16",
        upcycled_from=[{"name": f"synthetic-seed-{e}", "sha256": "0" * 64} for e in range(moe["num_experts"])],
    )
    return c


def seed_tensor(name, shape, e, seed, device):
    """Seed e's tensor `name`: norms 1, everything else N(0, 0.02) (llama's initializer_range)."""
    if "norm" in name:
        return torch.ones(shape, device=device)
    h = int(hashlib.sha256(f"{seed}/{e}/{name}".encode()).hexdigest()[:15], 16)
    g = torch.Generator(device=device).manual_seed(h)
    return torch.randn(shape, generator=g, device=device) * 0.02


def dense_name(name):
    """BAM name -> the dense seed's name of the tensor it copies (None: a router)."""
    if name.endswith("router.weight"):
        return None, None
    parts = name.split(".")
    if ".attn.experts." in name:
        i = parts.index("experts")
        return ".".join(parts[:i] + parts[i + 2 :]), int(parts[i + 1])
    if ".mlp.experts." in name:
        i = parts.index("experts")
        return ".".join(parts[: i + 1] + ["0"] + parts[i + 2 :]), int(parts[i + 1])
    return name, None  # shared: the seeds' average


def write_folder(out, shape, moe, seed=0, dtype=torch.bfloat16, device="cpu"):
    """Writes the BAM folder of `moe` over seeds of `shape` (moe=DENSE: seed 0 itself). Reuses `out` when its
    stamp matches. -> out"""
    config = bam_config(shape, moe)
    stamp = hashlib.sha256(json.dumps([config, seed, str(dtype)], sort_keys=True).encode()).hexdigest()
    if _stamp_matches(out, stamp):
        return out
    E = moe["num_experts"]
    names = {k: tuple(v.shape) for k, v in folder.build_model(config, "meta").state_dict().items()}
    tensors = []
    for name, shp in names.items():
        src, e = dense_name(name)
        if src is None:
            g = torch.Generator(device=device).manual_seed(seed + 12345 + len(tensors))
            t = torch.randn(shp, generator=g, device=device) * (0.1 / shp[1]) ** 0.5
        elif e is not None or E == 1:
            t = seed_tensor(src, shp, e or 0, seed, device)
        else:
            t = sum(seed_tensor(src, shp, s, seed, device) for s in range(E)) / E
        tensors.append((name, t.to(dtype).cpu()))
    return _write(out, stamp, config, tensors, code=("configuration_bam.py", "modeling_bam.py"))


def _stamp_matches(out, stamp):
    path = os.path.join(out, ".bench-stamp")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        return f.read() == stamp


def _write(out, stamp, config, tensors, code=()):
    """Writes the folder beside `out`, then moves it in (a killed run leaves no half folder at `out`); the stamp
    says what it holds. -> out"""
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    folder.write_sharded(tmp, tensors)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    for file in code:
        shutil.copyfile(os.path.join(folder.PYTHON_DIR, file), os.path.join(tmp, file))
    if stamp:
        with open(os.path.join(tmp, ".bench-stamp"), "w") as f:
            f.write(stamp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def write_native(bam_dir, fmt, out):
    """The native `fmt` ('mixtral' or 'qwen3_moe') folder of the BAM folder `bam_dir` (written by write_folder
    with BTX and, for qwen3_moe, QWEN3_SEEDS): its tensors renamed by native.to_native_state, its config
    mapped by native.to_native_config. Reuses `out` when its stamp matches. -> out"""
    config = folder.read_config(bam_dir)
    held = dict(native.IMPLIED, **native.FORMATS[fmt]["implied"])
    for key in ("attention_experts", "block", "qk_norm"):
        if config.get(key, "none") != held[key]:
            raise ValueError(f"{bam_dir}: {key} is {config.get(key)!r}; the {fmt} format holds {held[key]!r}")
    stamp = None  # a folder write_folder did not write (no stamp) is exported every time
    if os.path.exists(os.path.join(bam_dir, ".bench-stamp")):
        with open(os.path.join(bam_dir, ".bench-stamp")) as f:
            stamp = hashlib.sha256(f"{f.read()}/{fmt}".encode()).hexdigest()
    if stamp and _stamp_matches(out, stamp):
        return out
    rope = dict(rope_type="default")  # v5's key, kept in step with rope_theta by to_native_config
    base = dict(
        NATIVE_BASE[fmt],
        intermediate_size=config["intermediate_size"],  # as the CLI writes it (Qwen3-MoE: dense MLPs, none here)
        rope_parameters=rope,
        output_router_logits=False,
        dtype=config["dtype"],
    )
    native_config = native.to_native_config(fmt, dict(config, sliding_window=config.get("sliding_window")), base)
    tensors = list(native.to_native_state(fmt, folder.read_weights(bam_dir)).items())
    return _write(out, stamp, native_config, tensors)
