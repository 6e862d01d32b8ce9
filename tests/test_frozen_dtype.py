"""Weights by role (docs/training.md, "Frozen and quantized weights"): with bf16/fp16
precision the weights that do not train are stored in the compute dtype and loaded straight
in it (no fp32 copy, sharded safetensors included); trainable ones keep fp32 masters. fp32 and
fp64 runs are unchanged (the fp64 exactness tests elsewhere run as before).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from fit_helpers import FakeTokenizer, random_store, run_train
from peft_helpers import adapter_weights, peft_cfg, save_base

from llmtrain.engine.model import build_model, weight_bytes

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {arch: save_base(root, arch) for arch in ("gpt2", "bert")}


def _dtypes(model: torch.nn.Module, trainable: bool) -> set[torch.dtype]:
    return {p.dtype for p in model.parameters() if p.requires_grad == trainable}


@pytest.mark.parametrize(
    ("precision", "frozen_dtype", "frozen", "master"),
    [
        ("bf16", "auto", torch.bfloat16, torch.float32),
        ("fp16", "auto", torch.float16, torch.float32),
        ("bf16", "fp32", torch.float32, torch.float32),
        ("fp32", "auto", torch.float32, torch.float32),
        ("fp64", "auto", torch.float64, torch.float64),
    ],
)
def test_frozen_weights_take_the_compute_dtype_and_trainables_stay_master(
    tmp_path, bases, precision, frozen_dtype, frozen, master
):
    """A classification run: the base is frozen, the adapters and the fresh head (peft's
    modules_to_save) train."""
    cfg = peft_cfg(tmp_path, bases["bert"], precision=precision)
    cfg.model.frozen_dtype = frozen_dtype
    model = build_model(cfg, FakeTokenizer(), 3)
    assert _dtypes(model, trainable=False) == {frozen}
    assert _dtypes(model, trainable=True) == {master}
    head = [n for n, p in model.named_parameters() if p.requires_grad and "classifier" in n]
    assert head  # the head is among the fp32 trainables
    frozen_bytes = weight_bytes(model)[1]
    n_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert frozen_bytes == n_frozen * torch.finfo(frozen).bits // 8


def test_a_full_fine_tune_keeps_every_weight_fp32(tmp_path, bases):
    cfg = peft_cfg(tmp_path, bases["gpt2"], precision="bf16")
    cfg.model.peft = None
    model = build_model(cfg, FakeTokenizer(), None)
    assert _dtypes(model, trainable=True) == {torch.float32}
    assert weight_bytes(model)[1] == 0


def test_banner_shows_weight_bytes_by_role(tmp_path, bases):
    from llmtrain.commands.fit import weights_text
    from llmtrain.engine.distributed import DistInfo
    from llmtrain.pipeline import Plan

    cfg = peft_cfg(tmp_path, bases["gpt2"], precision="bf16")
    model = build_model(cfg, FakeTokenizer(), None)
    trainable, frozen = weight_bytes(model)
    text = weights_text(Plan(cfg, model, torch.device("cpu"), 2, 20, DistInfo()))
    assert text == (
        f"{trainable / 2**20:.1f} MiB trainable (fp32) + {frozen / 2**20:.1f} MiB frozen (bfloat16)"
    )


def test_adapters_over_a_bf16_base_are_close_to_those_over_an_fp32_base(tmp_path, bases):
    """Three runs from one base and data: bf16 compute over a bf16 base, bf16 compute over an
    fp32 base, fp32 throughout. Autocast already casts the base to bf16 for every matmul, so
    storing it in bf16 changes only what enters outside a matmul (embeddings, LayerNorm
    weights, the residual stream): the adapters differ by about what bf16 compute itself
    costs against fp32. Measured (max over the B tensors of max|diff| / max|B|): 0.8% for
    either comparison. Bounds: 3% absolute, and at most twice bf16 compute's own difference.
    SGD, because Adam's first steps are sign-like (m / sqrt(v) = ±1 at step 1) and turn a
    rounding difference in a near-zero gradient into a full ±lr step (~50% on this metric)."""
    store = random_store(24, seed=3)
    kw = {"steps": 4, "micro": 4, "optim": {"name": "sgd", "lr": 0.5}}
    runs = {"bf16-base": ("bf16", "auto"), "fp32-base": ("bf16", "fp32"), "fp32": ("fp32", "auto")}
    for name, (precision, frozen) in runs.items():
        cfg = peft_cfg(tmp_path / name, bases["gpt2"], precision=precision, **kw)
        cfg.model.frozen_dtype = frozen
        run_train(cfg, store)

    def rel(x: str, y: str) -> float:
        a, b = adapter_weights(tmp_path / x), adapter_weights(tmp_path / y)
        b_keys = [k for k in a if "lora_B" in k]  # B starts at zero: its value is the update
        return max(float((a[k] - b[k]).abs().max() / a[k].abs().max()) for k in b_keys)

    storage, compute = rel("fp32-base", "bf16-base"), rel("fp32", "fp32-base")
    assert 0 < storage < 0.03
    assert storage <= 2 * compute


# --------------------------------------------------------------------------- loading memory
MEASURE = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    sys.path.insert(0, {here!r})
    import peft, transformers  # imported before the baseline: loading is what is measured
    from fit_helpers import FakeTokenizer
    from qlora_helpers import llama_cfg
    from llmtrain.engine.model import build_model, total_parameters, weight_bytes

    cfg = llama_cfg(Path({out!r}), Path({base!r}), precision="bf16", quantize={quantize})
    if cfg.model.quantize is not None:
        import bitsandbytes  # its import (and its kernel lookup) is not loading the model
    if not {peft}:
        cfg.model.peft = None
    print("start", flush=True)
    sys.stdin.readline()  # the parent has read the baseline
    model = build_model(cfg, FakeTokenizer(), None)
    found = {{"weights": sum(weight_bytes(model)), "bf16": 2 * total_parameters(model)}}
    print(json.dumps(found), flush=True)
    sys.stdin.readline()  # the parent has stopped sampling
    """
)


def rss_anon(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon")


def peak_while_building(code: str) -> tuple[int, dict[str, int]]:
    """(peak RssAnon growth over the baseline while the child builds, its weights' bytes as
    trained and as bf16),
    sampled from outside every millisecond: a transient copy counts, not only what stays."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "start"
        baseline = rss_anon(proc.pid)
        done: list[str] = []
        reader = threading.Thread(target=lambda: done.append(proc.stdout.readline()))
        proc.stdin.write("go\n")
        proc.stdin.flush()
        reader.start()
        peak = baseline
        while reader.is_alive():
            peak = max(peak, rss_anon(proc.pid))
            time.sleep(0.001)
        proc.stdin.write("end\n")
        proc.stdin.flush()
        assert proc.wait(timeout=60) == 0 and done[0], "the child failed"
    finally:
        proc.kill()
    return peak - baseline, json.loads(done[0])


@pytest.fixture(scope="module")
def sharded_base(tmp_path_factory) -> Path:
    """A 34M-parameter Llama in bf16 (68 MB), saved in 4 shards."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    shape = {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8}
    heads = {"num_attention_heads": 8, "num_key_value_heads": 8}
    hf = LlamaConfig(vocab_size=8000, max_position_embeddings=128, **shape, **heads)
    hf.tie_word_embeddings = False
    path = tmp_path_factory.mktemp("sharded") / "base"
    LlamaForCausalLM(hf).to(torch.bfloat16).save_pretrained(path, max_shard_size="20MB")
    assert len(list(path.glob("model-*.safetensors"))) > 1
    return path


@pytest.mark.parametrize(
    ("peft", "quantize"),
    [
        pytest.param(True, None, marks=pytest.mark.slow),  # ~18 s on a shared 2-core machine
        pytest.param(False, None, marks=pytest.mark.slow),
        pytest.param(True, {"bits": 4}, marks=pytest.mark.slow),
    ],
    ids=["lora-bf16", "full-bf16", "qlora-nf4"],
)
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/self/status")
def test_loading_adds_no_more_private_memory_than_the_trained_weights(
    tmp_path, sharded_base, peft, quantize
):
    """The private memory (RssAnon: file-mapped pages left out) that build_model adds, at its
    peak while loading, is at most 1.15x the bytes of the weights as they will be trained: a
    bf16 base is not copied to fp32 on the way (which made it ~2x), a full fine-tune makes its
    one fp32 copy, a 4-bit base its packed weights."""
    if quantize is not None:
        pytest.importorskip("bitsandbytes")
    code = MEASURE.format(
        here=str(HERE), out=str(tmp_path), base=str(sharded_base), peft=peft, quantize=quantize
    )
    grown, sizes = peak_while_building(code)
    if quantize is None:
        assert grown <= 1.15 * sizes["weights"], (grown, sizes)
        return
    # QLoRA on CPU misses the 1.15x bound (README, "Fine-tune an 8B model"): transformers
    # materializes bf16 tensors before bitsandbytes packs them, and how many are alive at once
    # varies (measured 1.05x to 1.5x the bf16 bytes). What holds is that no fp32 copy is made:
    # one alone would be 2x the bf16 bytes.
    assert grown < 2.0 * sizes["bf16"], (grown, sizes)
