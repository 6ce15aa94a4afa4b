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
    from segcompare.models.segformer import UNUSED_OFFICIAL_KEYS

    official = {k: v for k, v in state_dict.items() if k not in UNUSED_OFFICIAL_KEYS}
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


# ---------------------------------------------------------------------------------------------
# SegFormer: NVlabs releases, MiT ImageNet backbones, mmsegmentation (0.x from v0.17, and 1.x).
# ---------------------------------------------------------------------------------------------


def segformer_release_to_official(state_dict: StateDict) -> StateDict:
    """NVlabs SegFormer segmentor checkpoint (`segformer.b0.1024x1024.city.160k.pth`'s
    `state_dict`) -> our keys: the same names, less `decode_head.conv_seg.*`, the classifier that
    mmseg's `BaseDecodeHead` creates and `SegFormerHead` never calls."""
    from segcompare.models.segformer import UNUSED_OFFICIAL_KEYS

    return {k: v for k, v in state_dict.items() if k not in UNUSED_OFFICIAL_KEYS}


def _strip(prefix: str, key: str) -> str:
    return key[len(prefix) :] if key.startswith(prefix) else key


def mit_to_official(state_dict: StateDict) -> StateDict:
    """NVlabs MiT ImageNet backbone (`mit_b0.pth` ... `mit_b5.pth`) -> our `backbone.*` keys.

    The files hold the encoder without prefix plus the 1000-class ImageNet classifier `head.*`,
    which a segmentation model has no use for and is dropped.
    """
    return {f"backbone.{k}": v for k, v in state_dict.items() if not k.startswith("head.")}


# (official name, mmseg name) inside one MiT block (mmseg/models/backbones/mit.py:
# `TransformerEncoderLayer`). mmseg holds q and kv in one `nn.MultiheadAttention`
# (`attn.attn.in_proj_*` = rows of q, then k, then v) and runs the MLP as 1×1 convs in
# `ffn.layers` = [fc1, pe_conv, act, drop, fc2, drop]; the two other sequences map one to one.
_MMSEG_MIT_BLOCK = [
    ("norm1", "norm1"),
    # attn.q + attn.kv <-> attn.attn.in_proj_{weight,bias}
    ("attn.proj", "attn.attn.out_proj"),
    ("attn.sr", "attn.sr"),
    ("attn.norm", "attn.norm"),
    ("norm2", "norm2"),
    ("mlp.fc1", "ffn.layers.0"),
    ("mlp.dwconv.dwconv", "ffn.layers.1"),
    ("mlp.fc2", "ffn.layers.4"),
]
_WB = ("weight", "bias")
_MMSEG_MIT_1X1 = ("mlp.fc1.weight", "mlp.fc2.weight")  # Linear [O, I] <-> 1×1 conv [O, I, 1, 1]


def mmseg_segformer_to_official(state_dict: StateDict) -> StateDict:
    """mmsegmentation SegFormer / MiT (`backbone.layers.0.0.projection.weight`, ...) -> our keys.

    Takes a segmentor checkpoint (`backbone.` prefix) or a backbone file converted by mmseg's
    `mit2mmseg.py` (no prefix); returns the `backbone.*` keys only. mmseg's `SegformerHead` is not
    the official head: each `decode_head.convs.N` is a 1×1 conv + BatchNorm + ReLU where the
    official `linear_cN` is one Linear, and it concatenates c1..c4 where the official head
    concatenates c4..c1, so the official architecture cannot hold it. Its `decode_head.*` keys are
    dropped here; `segcompare.models.checkpoint` says so to the user.
    """
    mm = {_strip("backbone.", k): v for k, v in state_dict.items()}
    mm = {k: v for k, v in mm.items() if not k.startswith("decode_head.")}
    keys = list(mm)
    out: StateDict = {}
    num_stages = _count(keys, r"layers\.(\d+)\.")
    for i in range(num_stages):
        _move(mm, f"layers.{i}.0.projection", out, f"backbone.patch_embed{i + 1}.proj")
        _move(mm, f"layers.{i}.0.norm", out, f"backbone.patch_embed{i + 1}.norm")
    for i in range(num_stages):
        for j in range(_count(keys, rf"layers\.{i}\.1\.(\d+)\.")):
            src, dst = f"layers.{i}.1.{j}", f"backbone.block{i + 1}.{j}"
            for name, mm_name in _MMSEG_MIT_BLOCK:
                if name == "attn.proj":  # official order: q, kv, proj, sr, norm
                    qkv = {t: mm.pop(f"{src}.attn.attn.in_proj_{t}", None) for t in _WB}
                    for part, first, last in (("q", 0, 1), ("kv", 1, 3)):  # in thirds
                        for t, value in qkv.items():
                            if value is not None:
                                third = value.shape[0] // 3
                                part_rows = value[first * third : last * third]
                                out[f"{dst}.attn.{part}.{t}"] = part_rows.clone()
                _move(mm, f"{src}.{mm_name}", out, f"{dst}.{name}")
            for key in _MMSEG_MIT_1X1:
                if f"{dst}.{key}" in out:
                    out[f"{dst}.{key}"] = out[f"{dst}.{key}"].flatten(1)
        _move(mm, f"layers.{i}.2", out, f"backbone.norm{i + 1}")
    if mm:
        raise _leftover_error(mm, "mmsegmentation SegFormer")
    return out


def official_segformer_to_mmseg(state_dict: StateDict) -> StateDict:
    """Our / official SegFormer backbone keys -> mmsegmentation's `backbone.layers.*` keys.

    The inverse of `mmseg_segformer_to_official` for the encoder. The official decode head has no
    mmseg counterpart (see there), so `decode_head.*` keys are dropped.
    """
    official = {k: v for k, v in state_dict.items() if not k.startswith("decode_head.")}
    keys = list(official)
    out: StateDict = {}
    num_stages = _count(keys, r"backbone\.patch_embed(\d+)\.") - 1  # 1-based
    for i in range(num_stages):
        s = i + 1
        _move(official, f"backbone.patch_embed{s}.proj", out, f"backbone.layers.{i}.0.projection")
        _move(official, f"backbone.patch_embed{s}.norm", out, f"backbone.layers.{i}.0.norm")
        for j in range(_count(keys, rf"backbone\.block{s}\.(\d+)\.")):
            src, dst = f"backbone.block{s}.{j}", f"backbone.layers.{i}.1.{j}"
            for key in _MMSEG_MIT_1X1:
                if f"{src}.{key}" in official:
                    official[f"{src}.{key}"] = official[f"{src}.{key}"][:, :, None, None]
            for name, mm_name in _MMSEG_MIT_BLOCK:
                if name == "attn.proj":  # mmseg order: in_proj, out_proj, sr, norm
                    for t in _WB:
                        q = official.pop(f"{src}.attn.q.{t}", None)
                        if q is not None:
                            kv = official.pop(f"{src}.attn.kv.{t}")
                            out[f"{dst}.attn.attn.in_proj_{t}"] = torch.cat([q, kv], dim=0)
                _move(official, f"{src}.{name}", out, f"{dst}.{mm_name}")
        _move(official, f"backbone.norm{s}", out, f"backbone.layers.{i}.2")
    if official:
        raise _leftover_error(official, "official SegFormer backbone")
    return out


# ---------------------------------------------------------------------------------------------
# HRNet: our names are those of HRNet-Semantic-Segmentation `lib/models/seg_hrnet.py`.
# ---------------------------------------------------------------------------------------------

# The ImageNet classification head of HRNet-Image-Classification `lib/models/cls_hrnet.py`
# (`_make_head` and the final Linear): no use to a segmentation model.
_HRNET_IMAGENET_HEAD = ("incre_modules.", "downsamp_modules.", "final_layer.", "classifier.")
# The class weights of the loss that HRNet-Semantic-Segmentation's train.py wraps with the model
# in `FullModel` (`self.loss = criterion`, a CrossEntropy / OhemCrossEntropy holding an
# `nn.CrossEntropyLoss(weight=...)`): saved with the model, not a model parameter.
_HRNET_LOSS_KEYS = ("loss.criterion.weight",)


def hrnet_release_to_official(state_dict: StateDict) -> StateDict:
    """Official HRNet Cityscapes release (`hrnet_w48_cityscapes_cls19_1024x2048_trainset.pth`)
    -> our keys: the `FullModel`'s `model.` prefix removed, the loss's class weights dropped.
    Keys without the prefix (a bare `seg_hrnet` state dict) pass unchanged."""
    return {_strip("model.", k): v for k, v in state_dict.items() if k not in _HRNET_LOSS_KEYS}


def hrnet_imagenet_to_official(state_dict: StateDict) -> StateDict:
    """Official HRNet ImageNet checkpoint (`hrnetv2_w48_imagenet_pretrained.pth`,
    `hrnet_w18_small_model_v2.pth`, ...) -> our backbone keys: the backbone has the same names
    in both repositories; the classification head (`incre_modules`, `downsamp_modules`,
    `final_layer`, `classifier`) is dropped, so `last_layer` is missing."""
    return {k: v for k, v in state_dict.items() if not k.startswith(_HRNET_IMAGENET_HEAD)}


# mmseg's HRNet (mmseg/models/backbones/hrnet.py) names every BatchNorm `normN` (stem and
# blocks) where the official code says `bnN`; all other names and indices are the same. The
# FCN head of its fcn_hr* configs (`FCNHead`, num_convs=1, kernel 1, concat_input=False,
# resize_concat of all branches) is the official `last_layer`: convs.0 = 1×1 conv without bias
# + BN + ReLU, conv_seg = the classifier.
_MMSEG_HRNET_NORM = re.compile(r"(^|\.)norm(\d)\.")
_OFFICIAL_HRNET_BN = re.compile(r"(^|\.)bn(\d)\.")


def mmseg_hrnet_to_official(state_dict: StateDict) -> StateDict:
    """mmsegmentation HRNet + FCN head (`backbone.stage2.0.branches.0.0.norm1.weight`,
    `decode_head.convs.0.conv.weight`, `decode_head.conv_seg.weight`) -> our keys.

    The head's conv has no bias where the official `last_layer.0` has one: it becomes zeros,
    which computes the same function. A backbone-only file (no `backbone.` prefix, no head)
    gives the backbone keys; an ImageNet head is dropped as in `hrnet_imagenet_to_official`.
    """
    out: StateDict = {}
    for key, value in state_dict.items():
        key = _strip("backbone.", key)
        if key.startswith(_HRNET_IMAGENET_HEAD):
            continue
        if key.startswith("decode_head.convs.0.conv."):
            key = "last_layer.0." + key[len("decode_head.convs.0.conv.") :]
        elif key.startswith("decode_head.convs.0.bn."):
            key = "last_layer.1." + key[len("decode_head.convs.0.bn.") :]
        elif key.startswith("decode_head.conv_seg."):
            key = "last_layer.3." + key[len("decode_head.conv_seg.") :]
        elif not key.startswith("decode_head."):
            key = _MMSEG_HRNET_NORM.sub(r"\1bn\2.", key)
        out[key] = value
        if key == "last_layer.0.weight":
            out["last_layer.0.bias"] = value.new_zeros(value.shape[0])
    return out


def official_hrnet_to_mmseg(state_dict: StateDict) -> StateDict:
    """Our / official HRNet keys -> mmsegmentation HRNet + FCN head keys.

    The inverse of `mmseg_hrnet_to_official`. mmseg's head conv has no bias: the official
    `last_layer.0.bias` b is folded into the BatchNorm that follows (running_mean - b), which
    computes the same function.
    """
    out: StateDict = {}
    for key, value in state_dict.items():
        if key == "last_layer.0.bias":
            continue
        if key.startswith("last_layer.0."):
            key = "decode_head.convs.0.conv." + key[len("last_layer.0.") :]
        elif key.startswith("last_layer.1."):
            key = "decode_head.convs.0.bn." + key[len("last_layer.1.") :]
            if key.endswith(".running_mean") and "last_layer.0.bias" in state_dict:
                value = value - state_dict["last_layer.0.bias"]
        elif key.startswith("last_layer.3."):
            key = "decode_head.conv_seg." + key[len("last_layer.3.") :]
        else:
            key = "backbone." + _OFFICIAL_HRNET_BN.sub(r"\1norm\2.", key)
        out[key] = value
    return out
