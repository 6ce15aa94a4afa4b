"""Checkpoint layout conversion: one pure state_dict -> state_dict function per foreign format.

Our models carry the official parameter names (NVlabs SegFormer, HRNet-Semantic-Segmentation), so
official checkpoints load with plain `load_state_dict`. Every other layout is turned into ours (and,
where an export needs it, back) by a function here. The functions do no I/O and never modify their
input; tensors are shared, not copied, except where two tensors must be joined or split.
"""

from __future__ import annotations

import re

import torch

StateDict = dict[str, torch.Tensor]

# ---------------------------------------------------------------------------------------------
# SegFormer: HuggingFace transformers <-> NVlabs/SegFormer (mmseg `mix_transformer.py` +
# `SegFormerHead`).
#
# HuggingFace's hub checkpoints (what `save_pretrained` writes and users download) name the
# encoder `segformer.encoder.*` and the head `decode_head.linear_c.N / linear_fuse /
# batch_norm / classifier`; key and value are two Linear layers where the official code has one
# `kv` Linear (key rows first, value rows second). transformers 5 renamed the modules in memory
# (`segformer.stages.N.blocks.M.attention.q_proj`, ...) but still writes the hub names to disk;
# `_HF_MEMORY_TO_DISK` maps the in-memory names back so both kinds of state dict are accepted.
# ---------------------------------------------------------------------------------------------

# (HF hub name, official name) of the parameter groups inside one MiT block, in official order.
# The key/value pair is handled apart (`attn.kv`), after `attn.q`.
_SEGFORMER_BLOCK = [
    ("layer_norm_1", "norm1"),
    ("attention.self.query", "attn.q"),
    # attention.self.key + attention.self.value -> attn.kv
    ("attention.output.dense", "attn.proj"),
    ("attention.self.sr", "attn.sr"),  # absent where the stage's sr_ratio is 1
    ("attention.self.layer_norm", "attn.norm"),  # absent where the stage's sr_ratio is 1
    ("layer_norm_2", "norm2"),
    ("mlp.dense1", "mlp.fc1"),
    ("mlp.dwconv.dwconv", "mlp.dwconv.dwconv"),
    ("mlp.dense2", "mlp.fc2"),
]

# transformers 5 in-memory names -> hub (on-disk) names, applied in this order.
_HF_MEMORY_TO_DISK = [
    (r"stages\.(\d+)\.patch_embeddings\.", r"encoder.patch_embeddings.\1."),
    (r"stages\.(\d+)\.blocks\.", r"encoder.block.\1."),
    (r"stages\.(\d+)\.layer_norm\.", r"encoder.layer_norm.\1."),
    (r"\.attention\.q_proj\.", ".attention.self.query."),
    (r"\.attention\.k_proj\.", ".attention.self.key."),
    (r"\.attention\.v_proj\.", ".attention.self.value."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.attention\.sequence_reduction\.sequence_reduction\.", ".attention.self.sr."),
    (r"\.attention\.sequence_reduction\.layer_norm\.", ".attention.self.layer_norm."),
    (r"\.layernorm_before\.", ".layer_norm_1."),
    (r"\.layernorm_after\.", ".layer_norm_2."),
    (r"\.mlp\.fc1\.", ".mlp.dense1."),
    (r"\.mlp\.fc2\.", ".mlp.dense2."),
    (r"^decode_head\.linear_projections\.", "decode_head.linear_c."),
]

# Tensor names inside one layer, in the order PyTorch registers them.
_TENSOR_ORDER = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]


def _hf_disk_name(key: str) -> str:
    """A transformers state-dict key (in-memory or hub) as its hub name with `segformer.` prefix."""
    for pattern, replacement in _HF_MEMORY_TO_DISK:
        key = re.sub(pattern, replacement, key)
    if key.startswith("encoder."):  # a bare SegformerModel has no `segformer.` prefix
        key = "segformer." + key
    return key


def _count(keys: list[str], pattern: str) -> int:
    """1 + the largest integer that `pattern`'s group captures in `keys` (0 when none match)."""
    found = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
    return max(found) + 1 if found else 0


def _move(src: StateDict, src_prefix: str, dst: StateDict, dst_prefix: str) -> None:
    """Move every tensor `src_prefix.<name>` of `src` to `dst_prefix.<name>` of `dst`."""
    names = [k[len(src_prefix) + 1 :] for k in src if k.startswith(src_prefix + ".")]
    order = {name: i for i, name in enumerate(_TENSOR_ORDER)}
    for name in sorted(names, key=lambda n: order.get(n, len(order))):
        dst[f"{dst_prefix}.{name}"] = src.pop(f"{src_prefix}.{name}")


def _leftover_error(leftover: StateDict, source: str) -> ValueError:
    names = ", ".join(sorted(leftover)[:8]) + (" ..." if len(leftover) > 8 else "")
    return ValueError(f"{len(leftover)} key(s) of the {source} state dict not recognised: {names}")


def hf_segformer_to_official(state_dict: StateDict) -> StateDict:
    """HuggingFace `SegformerForSemanticSegmentation` / `SegformerModel` -> official NVlabs names.

    Accepts the hub names (`segformer.encoder.block.0.0.attention.self.query.weight`, ...) and the
    transformers 5 in-memory names (`segformer.stages.0.blocks.0.attention.q_proj.weight`, ...).
    The result is in the official order; key and value are concatenated into `attn.kv`. A bare
    encoder gives only the `backbone.*` keys. `classifier.*` (the ImageNet head of
    `SegformerForImageClassification`) has no place in a segmentation model and is dropped;
    any other unrecognised key is a ValueError.
    """
    hf = {_hf_disk_name(k): v for k, v in state_dict.items()}
    hf = {k: v for k, v in hf.items() if not k.startswith("classifier.")}
    keys = list(hf)
    enc = "segformer.encoder"
    num_stages = _count(keys, rf"{enc}\.patch_embeddings\.(\d+)\.")
    out: StateDict = {}
    for i in range(num_stages):
        embed = f"backbone.patch_embed{i + 1}"
        _move(hf, f"{enc}.patch_embeddings.{i}.proj", out, f"{embed}.proj")
        _move(hf, f"{enc}.patch_embeddings.{i}.layer_norm", out, f"{embed}.norm")
    for i in range(num_stages):
        for j in range(_count(keys, rf"{enc}\.block\.{i}\.(\d+)\.")):
            src, dst = f"{enc}.block.{i}.{j}", f"backbone.block{i + 1}.{j}"
            for hf_name, name in _SEGFORMER_BLOCK:
                _move(hf, f"{src}.{hf_name}", out, f"{dst}.{name}")
                if name == "attn.q":  # official order: q, kv, proj, sr, norm
                    for t in ("weight", "bias"):
                        k, v = f"{src}.attention.self.key.{t}", f"{src}.attention.self.value.{t}"
                        if k in hf:
                            out[f"{dst}.attn.kv.{t}"] = torch.cat([hf.pop(k), hf.pop(v)], dim=0)
        _move(hf, f"{enc}.layer_norm.{i}", out, f"backbone.norm{i + 1}")
    # The official head lists linear_c4 first.
    for i in reversed(range(_count(keys, r"decode_head\.linear_c\.(\d+)\."))):
        _move(hf, f"decode_head.linear_c.{i}.proj", out, f"decode_head.linear_c{i + 1}.proj")
    _move(hf, "decode_head.linear_fuse", out, "decode_head.linear_fuse.conv")
    _move(hf, "decode_head.batch_norm", out, "decode_head.linear_fuse.bn")
    _move(hf, "decode_head.classifier", out, "decode_head.linear_pred")
    if hf:
        raise _leftover_error(hf, "HuggingFace SegFormer")
    return out


def official_segformer_to_hf(state_dict: StateDict) -> StateDict:
    """Official NVlabs SegFormer names -> HuggingFace hub names (what `save_pretrained` writes).

    The inverse of `hf_segformer_to_official`: `attn.kv` is split in half into key and value.
    `decode_head.conv_seg.*` (mmseg's unused classifier) has no HF counterpart and is dropped;
    any other unrecognised key is a ValueError. The result loads into transformers'
    `SegformerForSemanticSegmentation` (via `from_pretrained` of a saved file, which applies
    transformers' own renaming).
    """
    official = {k: v for k, v in state_dict.items() if not k.startswith("decode_head.conv_seg.")}
    keys = list(official)
    enc = "segformer.encoder"
    out: StateDict = {}
    num_stages = _count(keys, r"backbone\.patch_embed(\d+)\.") - 1  # patch_embed1..N: 1-based
    for i in range(num_stages):
        s = i + 1
        _move(official, f"backbone.patch_embed{s}.proj", out, f"{enc}.patch_embeddings.{i}.proj")
        _move(
            official, f"backbone.patch_embed{s}.norm", out, f"{enc}.patch_embeddings.{i}.layer_norm"
        )
        for j in range(_count(keys, rf"backbone\.block{s}\.(\d+)\.")):
            src, dst = f"backbone.block{s}.{j}", f"{enc}.block.{i}.{j}"
            for hf_name, name in _SEGFORMER_BLOCK:
                _move(official, f"{src}.{name}", out, f"{dst}.{hf_name}")
                if name == "attn.q":
                    for t in ("weight", "bias"):
                        kv = official.pop(f"{src}.attn.kv.{t}", None)
                        if kv is not None:
                            key, value = kv.chunk(2, dim=0)
                            out[f"{dst}.attention.self.key.{t}"] = key.clone()
                            out[f"{dst}.attention.self.value.{t}"] = value.clone()
        _move(official, f"backbone.norm{s}", out, f"{enc}.layer_norm.{i}")
    for i in range(_count(keys, r"decode_head\.linear_c(\d+)\.") - 1):  # linear_c1..N
        _move(official, f"decode_head.linear_c{i + 1}.proj", out, f"decode_head.linear_c.{i}.proj")
    _move(official, "decode_head.linear_fuse.conv", out, "decode_head.linear_fuse")
    _move(official, "decode_head.linear_fuse.bn", out, "decode_head.batch_norm")
    _move(official, "decode_head.linear_pred", out, "decode_head.classifier")
    if official:
        raise _leftover_error(official, "official SegFormer")
    return out
