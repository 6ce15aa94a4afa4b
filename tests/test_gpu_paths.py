"""The CUDA paths, proven on the CPU (issue 26): what the first GPU run would hit, each reproduced
with CPU tensors.

- a prepared model with float16 weights fed float32 maps (CUDA autocast runs layer_norm in
  float32): crash 1, a RecursionError in FusedConv;
- random states saved on a node with 8 GPUs, restored in a process that sees 1: crash 2;
- OHEM without host syncs gives the loss of the sort-based official formula;
- train.amp=fp16 with an enabled GradScaler, a train.compile=true run, SyncBatchNorm converted
  then saved and loaded, the device each torchrun process takes.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_SEGFORMER, model_state

from segcompare.config import config_from_dict
from segcompare.infer import fast
from segcompare.infer.fast import FusedConv, prepare_for_inference
from segcompare.losses import ohem_cross_entropy
from segcompare.models import build_model


@pytest.fixture()
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- crash 1: float16 weights, float32 maps -----------------------------------------------------
def test_fused_conv_with_float16_weights_takes_float32_maps() -> None:
    """CUDA autocast hands a float32 map (layer_norm's output) to a float16 FusedConv: it runs in
    the weights' dtype, as F.conv2d on the same float16 numbers (was: infinite recursion)."""
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(8, 4, 3, 3, generator=g), torch.randn(8, generator=g)
    conv = FusedConv(weight.half(), bias.half(), padding=(1, 1), act="relu")
    x, residual = torch.randn(2, 4, 6, 6, generator=g), torch.randn(2, 8, 6, 6, generator=g)
    # the reference: float64 on the float16-rounded numbers, then rounded to float16
    ref = F.conv2d(x.half().double(), weight.half().double(), bias.half().double(), padding=1)
    for res in (None, residual):
        for inplace in (False, True):
            owned = None if res is None else res.clone()
            out = conv(x, owned, inplace=inplace)
            expected = torch.relu(ref if res is None else ref + res.half().double())
            assert out.dtype == torch.float16
            assert torch.allclose(out.double(), expected, atol=1e-2, rtol=1e-3)


def test_prepared_float16_segformer_under_cuda_like_autocast(monkeypatch, one_thread) -> None:
    """The Predictor's --amp path on CUDA (a float16 prepared model under float16 autocast),
    with layer_norm returning float32 as CUDA autocast makes it: logits close to the eager
    float32 model's."""
    torch.manual_seed(0)
    model = build_model("segformer-b0", **TINY_SEGFORMER["model"]["overrides"]).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        reference = model(x)
    prepared = prepare_for_inference(model, dtype=torch.float16)

    def layer_norm_as_cuda_autocast(norm: torch.nn.LayerNorm, y: torch.Tensor) -> torch.Tensor:
        # CUDA autocast runs layer_norm in float32 (input and parameters), output float32
        y = F.layer_norm(y.permute(0, 2, 3, 1).float(), norm.normalized_shape,
                         norm.weight.float(), norm.bias.float(), norm.eps)
        return y.permute(0, 3, 1, 2)

    monkeypatch.setattr(fast, "_layer_norm", layer_norm_as_cuda_autocast)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        logits = prepared(x).float()
    # float16 keeps 11 bits: the difference measured here is 1.2e-3 of the largest logit
    assert (logits - reference).abs().max() < 5e-3 * reference.abs().max()


def test_float32_kept_conv_stays_float32_for_bfloat16_maps() -> None:
    """A conv that the bf16 self-check keeps in float32 computes in float32 and returns the
    input's dtype; marked explicitly, not guessed from a dtype mismatch."""
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(4, 4, 1, 1, generator=g)
    conv = FusedConv(weight, None)
    conv.keep_float32 = True
    x = torch.randn(1, 4, 3, 3, generator=g).bfloat16()
    out = conv(x)
    assert out.dtype == torch.bfloat16
    expected = F.conv2d(x.double(), weight.double()).bfloat16()
    assert torch.equal(out, expected)


# --- crash 2: random states of another node -----------------------------------------------------
def test_rng_states_restore_on_a_node_with_fewer_gpus(monkeypatch) -> None:
    """A checkpoint holds the states written on a node with 8 visible GPUs; the resuming
    process sees one (a smaller node, or SLURM binding one GPU per task). The process restores
    its own device's state and nothing else."""
    from segcompare import run_folder

    cpu_states = run_folder.rng_states()  # python, numpy, torch (no CUDA here)
    restored = []

    def set_rng_state(state: torch.Tensor, device: object = "cuda") -> None:
        index = torch.device(device).index if not isinstance(device, int) else device
        index = 0 if index is None else index
        if index >= torch.cuda.device_count():  # what CUDA says about a GPU it does not have
            raise IndexError(f"invalid device ordinal {index}")
        restored.append((index, state))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", set_rng_state)
    eight = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]
    state = {**cpu_states, "cuda": eight}  # a checkpoint written on a node with 8 GPUs
    run_folder.set_rng_states(state)
    assert len(restored) == 1 and restored[0][0] == 0 and torch.equal(restored[0][1], eight[0])
    # what is saved now: this process's device only
    own = torch.full((16,), 7, dtype=torch.uint8)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": own)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: eight)
    saved = run_folder.rng_states()
    assert torch.equal(saved["cuda"], own)
    restored.clear()
    run_folder.set_rng_states(saved)
    assert len(restored) == 1 and torch.equal(restored[0][1], own)


# --- OHEM without host syncs --------------------------------------------------------------------
def _ohem_sorted(logits, label, threshold, min_kept, ignore_index=255, class_weights=None):
    """HRNet's OhemCrossEntropy as the official code computes it (lib/core/criterion.py): sort
    the labelled pixels' target probabilities, threshold = max(threshold, the min_kept-th), mean
    of the per-pixel losses below it. Boolean indexing and a full sort: host syncs on CUDA."""
    logits = F.interpolate(logits.float(), size=label.shape[-2:], mode="bilinear",
                           align_corners=False)
    pixel_losses = F.cross_entropy(logits, label, weight=class_weights, ignore_index=ignore_index,
                                   reduction="none").contiguous().view(-1)
    mask = label.contiguous().view(-1) != ignore_index
    if not mask.any():
        return logits.sum() * 0.0
    tmp_target = label.clone()
    tmp_target[tmp_target == ignore_index] = 0
    pred = F.softmax(logits, dim=1).gather(1, tmp_target.unsqueeze(1))
    pred, ind = pred.contiguous().view(-1)[mask].contiguous().sort()
    min_value = pred[min(min_kept, pred.numel() - 1)]
    cutoff = max(min_value.item(), threshold)
    pixel_losses = pixel_losses[mask][ind]
    return pixel_losses[pred < cutoff].mean()


@pytest.mark.parametrize("case", range(6))
def test_ohem_equals_the_sort_based_formula(case: int) -> None:
    g = torch.Generator().manual_seed(case)
    n, c, h, w = 2, 5, 6, 8
    logits = torch.randn(n, c, h, w, generator=g) * 3
    label = torch.randint(0, c, (n, 12, 16), generator=g)
    ignored = torch.rand(label.shape, generator=g) < [0.0, 0.3, 0.9, 0.3, 0.99, 1.0][case]
    label[ignored] = 255
    weights = torch.rand(c, generator=g) + 0.5 if case % 2 else None
    labelled = int((label != 255).sum())
    for threshold in (0.05, 0.7, 0.99):
        for min_kept in (0, 1, 10, labelled // 2, labelled, labelled + 5, 10_000):
            got = ohem_cross_entropy(logits, label, threshold, min_kept, 255, weights)
            want = _ohem_sorted(logits, label, threshold, min_kept, 255, weights)
            if math.isnan(want.item()):  # nothing below the cutoff: the official mean is NaN
                assert got.item() == 0.0
                continue
            assert got.item() == pytest.approx(want.item(), rel=1e-6, abs=1e-7), (
                threshold, min_kept)


def test_ohem_gradient_equals_the_sort_based_formula() -> None:
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(1, 4, 5, 5, generator=g)
    label = torch.randint(0, 4, (1, 10, 10), generator=g)
    label[0, :3] = 255
    grads = []
    for loss_fn in (ohem_cross_entropy, _ohem_sorted):
        x = logits.clone().requires_grad_(True)
        loss_fn(x, label, 0.7, 20).backward()
        grads.append(x.grad)
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7)


# --- the training loop's CUDA switches, on the CPU ---------------------------------------------
@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from segcompare.data.synth import make_synthetic_cityscapes

    root = tmp_path_factory.mktemp("synthcity")
    make_synthetic_cityscapes(root, train=4, val=1, size=(64, 128), seed=0)
    return root


def _tiny(root: Path, **train: object):
    return config_from_dict({
        **TINY_SEGFORMER,
        "data": {"root": str(root), "crop_size": [48, 48], "base_size": 128},
        "optim": {"lr": 2e-3, "warmup_iters": 1},
        "train": {"max_iters": 3, "batch_size": 2, "num_workers": 0, "log_every": 1,
                  "eval_every": 0, "checkpoint_every": 3, **train},
    })  # fmt: skip


def test_fp16_with_an_enabled_grad_scaler(tmp_path: Path, synth_root: Path, one_thread) -> None:
    from segcompare.train import train

    summary = train(_tiny(synth_root, amp="fp16"), tmp_path / "run")
    assert summary["iter"] == 3 and math.isfinite(summary["final_loss"])
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "iter_3.pt", weights_only=True)
    assert checkpoint["scaler"]["scale"] > 0  # a disabled scaler's state is empty


def test_compiled_training_equals_eager(tmp_path: Path, synth_root: Path, one_thread) -> None:
    """train.compile=true through dynamo and AOT autograd (the aot_eager backend: inductor's C++
    build takes minutes on a CPU; the smoke run uses inductor on the GPU): the same weights
    as the eager run, to float rounding."""
    import torch._dynamo

    from segcompare.train import train

    def config(compile_: bool):  # SGD without dropout: AdamW's first steps are about
        cfg = _tiny(synth_root, compile=compile_)  # lr * sign(gradient), which float rounding
        cfg.optim.name, cfg.optim.momentum = "sgd", 0.9  # of a gradient near 0 can flip
        cfg.model.overrides.update(drop_path_rate=0.0, dropout=0.0)
        return cfg

    train(config(False), tmp_path / "eager")
    # dynamo's own patch: monkeypatch.setattr reads the (hidden) option as missing and deletes
    # it on undo, which breaks every later compile and torch.export in the process
    with torch._dynamo.config.patch(debug_backend_override=">=0:aot_eager"):
        torch._dynamo.reset()
        train(config(True), tmp_path / "compiled")
    torch._dynamo.reset()
    eager = model_state(tmp_path / "eager" / "checkpoints" / "iter_3.pt")
    compiled = model_state(tmp_path / "compiled" / "checkpoints" / "iter_3.pt")
    assert eager.keys() == compiled.keys()
    for key in eager:  # measured: 1.2e-7 at most (2026-12-04)
        assert torch.allclose(eager[key], compiled[key], rtol=1e-5, atol=1e-6), key


def test_sync_batchnorm_saves_and_loads_in_eval_mode(tmp_path: Path) -> None:
    """What rank 0 saves from a SyncBatchNorm model loads into the plain model (official names
    unchanged) and computes the same in eval mode, where SyncBatchNorm needs no process group."""
    from segcompare.models.save import save_weights

    torch.manual_seed(0)
    model = build_model("hrnet-w18-small-v1").train()
    with torch.no_grad():  # running statistics that differ from the initial ones
        model(torch.randn(2, 3, 64, 64))
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model).eval()
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = synced(x)
    save_weights(synced, tmp_path / "w.safetensors")
    loaded = build_model(weights=tmp_path / "w.safetensors").eval()
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in loaded.modules())
    with torch.no_grad():
        assert torch.equal(loaded(x), out)


@pytest.mark.parametrize(
    "gpus, local_rank, local_world, expected",
    [(0, 0, 1, ("cpu", None, "gloo")), (2, 1, 2, ("cuda", 1, "nccl")),
     (1, 1, 2, ("cuda", 0, "gloo")), (8, 3, 8, ("cuda", 3, "nccl"))],
)  # fmt: skip
def test_train_device(monkeypatch, gpus, local_rank, local_world, expected) -> None:
    """Each torchrun process takes GPU LOCAL_RANK and NCCL; processes that share a GPU reduce
    with gloo (NCCL refuses two processes on one GPU); without CUDA, the CPU and gloo."""
    from segcompare.train import train_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
    device, backend = train_device("auto")
    assert (device.type, device.index, backend) == expected


def test_train_device_cuda_without_a_gpu_is_one_error(monkeypatch) -> None:
    from segcompare.train import train_device
    from segcompare.utils import SegcompareError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SegcompareError, match="no CUDA device"):
        train_device("cuda")
    assert train_device("cpu")[0].type == "cpu"


def test_gpu_memory_precheck_is_one_error(monkeypatch) -> None:
    """A size too large for the GPU: one error with the estimate and the GPU's free memory,
    before anything is allocated (was: a CUDA out-of-memory traceback)."""
    from segcompare.stats import check_forward_memory
    from segcompare.utils import SegcompareError

    free = 2 * 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a test GPU")
    with pytest.raises(SegcompareError, match=r"GPU memory on a test GPU, more than the 2.0 GiB"):
        check_forward_memory("segformer-b0", (1024, 2048), 8, device="cuda")
    check_forward_memory("segformer-b0", (64, 128), 1, device="cuda")  # fits: no error


def test_train_puts_back_the_global_settings(tmp_path: Path, synth_root: Path,
                                             one_thread) -> None:
    """train() as a library call leaves determinism and the matmul precision as it found them."""
    from segcompare.train import train

    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
              torch.get_float32_matmul_precision())
    train(_tiny(synth_root, deterministic=True, max_iters=2, checkpoint_every=2), tmp_path / "r")
    after = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
             torch.get_float32_matmul_precision())
    assert after == before and before[0] is False
