"""FSDP2 with adapters (docs/architecture.md, "Scale-out"): 2 CPU ranks with gloo under
torchrun against one process.

- LoRA on a GPT-2 base in fp64: the adapters after 3 steps (micro 2 × k 2 × 2 ranks) equal one
  process with the whole window in one micro-batch, to 1e-10 relative — the tolerance
  test_ddp.py states for fp64 (summation order only; a wrong normalisation is off by > 1e-6).
- QLoRA (nf4, the codes stored as fp32 so FSDP can shard them) on a Llama base in fp32: the
  adapters to 1e-4 and the logged loss and gradient norm to 1e-5 relative. fp32 rounds each
  sum at ~6e-8; two ranks add the same terms in another order, and three AdamW steps at lr 1e-2
  move the adapters by ~1e-2 of their size, so order effects stay ~1e-6; a gradient scaled by
  the world size (a wrong normalisation) moves the logged norm by 2x.
- Checkpoints hold the adapters alone in the one-process format: an FSDP checkpoint resumes in
  one process, and a one-process checkpoint resumes under FSDP, both equal to the run that was
  never stopped.
- OOM recovery on one rank (DDP with LoRA: under FSDP an OOM ends the job, test_ddp.py) and
  the probe, whose ranks agree on the minimum, with adapters.

Every multi-process case runs in ONE torchrun job (starting ranks is the expensive part).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from dist_helpers import probe_with_one_rank_oom, run_function
from fit_helpers import FakeTokenizer, random_store, run_train
from peft_helpers import adapter_weights, max_rel, peft_cfg, save_base
from qlora_helpers import NF4, llama_cfg, save_llama
from safetensors.torch import load_file

from llmtrain.engine import checkpoint as ckpt
from llmtrain.engine.metrics import read_metrics
from llmtrain.engine.parallel import is_fsdp

pytest.importorskip("peft")

QLORA_ADAPTER_TOL = 1e-4
QLORA_RECORD_TOL = 1e-5
WINDOW = {"micro": 2, "global_batch": 8, "steps": 3}
SAVING = {"train": {"save_every": 2}}
KILL = {"LLMTRAIN_FAULT_KILL": "step_end:2", "LLMTRAIN_FAULT_KILL_MODE": "raise"}


def _lora(root: Path, name: str, **extra):
    return peft_cfg(root / name, root / "base-gpt2", **{**WINDOW, **SAVING, **extra})


def _qlora(root: Path, name: str, **extra):
    kw = {**WINDOW, **SAVING, "precision": "fp32", **extra}
    return llama_cfg(root / name, root / "base-llama", quantize=NF4, **kw)


def _fsdp(train: dict | None = None) -> dict:
    return {**SAVING["train"], "parallel": "fsdp", **(train or {})}


def _store():
    return random_store(40, seed=1)


def _killed(cfg, **kw) -> None:
    """Train until the kill point after step 2 (its checkpoint written) fires."""
    from llmtrain.engine.faults import SimulatedKill

    os.environ.update(KILL)
    try:
        _train(cfg, **kw)
        raise AssertionError("the kill point did not fire")
    except SimulatedKill:
        pass
    finally:
        for key in KILL:
            del os.environ[key]


def _train(cfg, *, dist=None, resume=None):
    from llmtrain.engine.loop import train
    from llmtrain.engine.model import build_model

    tok = FakeTokenizer()
    model = build_model(cfg, tok, None)
    kw = {} if dist is None else {"dist": dist}
    train(cfg, model, tok, _store(), None, micro_batch=int(cfg.batch.micro_batch),
          device=torch.device("cpu"), resume=resume, **kw)  # fmt: skip
    return model


# ------------------------------------------------------------------------ the ranks' side
def _ranks(root: str) -> None:
    from llmtrain.engine.distributed import setup, teardown

    torch.set_num_threads(1)
    r = Path(root)
    dist = setup(torch.device("cpu"))
    assert dist.world_size == 2
    try:
        assert is_fsdp(_train(_lora(r, "lora", train=_fsdp()), dist=dist))
        _check_sharded_4bit(_train(_qlora(r, "qlora", train=_fsdp()), dist=dist))
        # the one-process checkpoint that the test side wrote, continued on two ranks
        _train(_lora(r, "from-single", train=_fsdp()), dist=dist, resume="auto")
        _killed(_lora(r, "from-fsdp", train=_fsdp()), dist=dist)
        oom = {"LLMTRAIN_FAULT_OOM_MICRO": "1", "LLMTRAIN_FAULT_OOM_RANK": "1"}
        os.environ.update(oom)
        _train(_lora(r, "oom-ddp"), dist=dist)
        for key in oom:
            del os.environ[key]
        cfg = _lora(r, "probe", train=_fsdp(), batch={"probe": {"max_micro": 16}})
        probe_with_one_rank_oom(cfg, r, dist)
    finally:
        teardown()


def _check_sharded_4bit(model: torch.nn.Module) -> None:
    """FSDP2 ran, and each 4-bit layer's packed codes are a row shard (a DTensor) stored as
    fp32, its quantization state intact beside it."""
    from bitsandbytes.nn import Linear4bit  # not peft's LoRA layer of the same name
    from torch.distributed.tensor import DTensor

    assert is_fsdp(model)
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert layers
    for layer in layers:
        assert isinstance(layer.weight, DTensor) and layer.weight.dtype == torch.float32
        assert layer.quant_state is not None


# ----------------------------------------------------------------------- the tests' side
@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fsdp-peft")
    save_base(root)
    save_llama(root)
    _killed(_lora(root, "from-single"))  # a one-process checkpoint at step 2
    res = run_function("test_fsdp_peft:_ranks", str(root), check=False, timeout=600)
    (root / "output.txt").write_text(f"exit {res.returncode}\n{res.stdout}\n{res.stderr}")
    return root


@pytest.fixture(scope="module")
def single(job) -> dict[str, Path]:
    """One process, the whole window in one micro-batch (k 1): the references."""
    whole = {"micro": 8}
    _train(_lora(job, "single-lora", **whole))
    _train(_qlora(job, "single-qlora", **whole))
    return {"lora": job / "single-lora", "qlora": job / "single-qlora"}


def _done(job: Path, name: str) -> Path:
    out = job / name
    if not (out / "adapter").is_dir():
        pytest.fail(
            f"{name} did not finish in the 2-rank job:\n" + (job / "output.txt").read_text()[-6000:]
        )
    return out


def _records(out: Path, key: str) -> list[float]:
    return [r[key] for r in read_metrics(out / "metrics.jsonl") if r.get("split") == "train"]


@pytest.mark.slow
def test_fsdp_lora_equals_one_process_in_fp64(job, single):
    out = _done(job, "lora")
    assert max_rel(adapter_weights(single["lora"]), adapter_weights(out)) < 1e-10
    final = load_file(str(out / "final" / "model.safetensors"))
    reference = load_file(str(single["lora"] / "final" / "model.safetensors"))
    assert max_rel(reference, final) < 1e-10  # merged by rank 0 into the rebuilt base
    assert _records(out, "loss") == pytest.approx(_records(single["lora"], "loss"), rel=1e-10)


@pytest.mark.slow
def test_fsdp_qlora_equals_one_process_in_fp32(job, single):
    out = _done(job, "qlora")
    assert max_rel(adapter_weights(single["qlora"]), adapter_weights(out)) < QLORA_ADAPTER_TOL
    for key in ("loss", "grad_norm"):
        want = _records(single["qlora"], key)
        assert _records(out, key) == pytest.approx(want, rel=QLORA_RECORD_TOL), key


@pytest.mark.slow
def test_an_fsdp_checkpoint_holds_the_adapters_in_the_one_process_format(job):
    fsdp = ckpt.checkpoint_path(_done(job, "lora"), 2) / "model.safetensors"
    one = ckpt.checkpoint_path(job / "from-single", 2) / "model.safetensors"
    names = sorted(load_file(str(fsdp)))
    assert names == sorted(load_file(str(one)))
    assert names and all("lora_" in n for n in names)  # no frozen base tensor was gathered
    state = torch.load(fsdp.parent / "optimizer.pt", weights_only=True)
    assert sorted(state["state"]) == list(range(len(names)))  # integer-keyed, one per adapter


@pytest.mark.slow
def test_a_one_process_checkpoint_resumes_under_fsdp(job, single):
    out = _done(job, "from-single")
    assert max_rel(adapter_weights(single["lora"]), adapter_weights(out)) < 1e-10


@pytest.mark.slow
def test_an_fsdp_checkpoint_resumes_in_one_process(job, single):
    cfg = _lora(job, "from-fsdp")
    assert ckpt.list_checkpoints(ckpt.checkpoint_dir(cfg.run.output_dir)), (
        job / "output.txt"
    ).read_text()[-6000:]
    run_train(cfg, _store(), resume="auto")
    assert max_rel(adapter_weights(single["lora"]), adapter_weights(job / "from-fsdp")) < 1e-10


@pytest.mark.slow
def test_an_oom_on_one_rank_with_adapters_recovers_exactly(job, single):
    out = _done(job, "oom-ddp")
    assert max_rel(adapter_weights(single["lora"]), adapter_weights(out)) < 1e-10
    assert _records(out, "micro_batch")[-1] == 1  # rank 1's retry size, agreed by both


@pytest.mark.slow
def test_the_probe_with_adapters_agrees_on_both_ranks(job):
    answers = []
    for rank in (0, 1):
        path = job / f"probe-rank{rank}.json"
        if not path.is_file():
            pytest.fail((job / "output.txt").read_text()[-6000:])
        answers.append(json.loads(path.read_text()))
    assert answers == [3, 3]
