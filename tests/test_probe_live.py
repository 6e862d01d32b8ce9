"""The probe trains the LIVE model (llmtrain/probe/trial.py; docs/architecture.md, "Probing"):
no copy of the weights is held, the trials use the run's chunked loss, and weights, buffers,
gradients, optimizer state, train mode, RNG and data position are bit-identical afterwards —
also when there is no real optimizer yet (what `fit` does), and after an error."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from fit_helpers import graph_tensors
from probe_helpers import CPU, adamw, gpt2, make_setup, probe_config, run_probe

from llmtrain import probe as P
from llmtrain.engine import loss as L
from llmtrain.engine.step import StepSpec
from llmtrain.probe import trial as T
from llmtrain.probe.memory import CpuMemory, CudaMemory, rss_bytes

pytestmark = pytest.mark.usefixtures("probe_measurement")


def everything(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Every bit a trial could change, as plain comparable data."""
    out = {f"state.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    out |= {f"grad.{n}": p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for i, st in enumerate(optimizer.state.values() if optimizer else ()):
        out |= {f"opt.{i}.{k}": (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()}
    out["training"] = model.training
    out["rng"] = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        if k == "rng":
            assert v[0] == b[k][0] and np.array_equal(v[1], b[k][1]) and torch.equal(v[2], b[k][2])
        elif torch.is_tensor(v):
            assert v.dtype == b[k].dtype and torch.equal(v, b[k]), k
        else:
            assert v == b[k], k


def test_fit_style_probe_leaves_everything_bit_identical(tmp_path, monkeypatch):
    """No real optimizer (fit probes before building it), gradients present, eval mode,
    dropout on, chunked loss: after a search with OOMs, all of it is as before."""
    model = gpt2(dropout=0.1)
    ids = torch.randint(0, 1024, (2, 16), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()  # gradients that must survive
    model.eval()
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    before = everything(model)
    assert any(k.startswith("grad.") for k in before)

    monkeypatch.setenv("LLMTRAIN_FAULT_OOM_MICRO", "5")
    setup = make_setup(model, seq_len=32, loss_chunk=64, scratch_dir=str(tmp_path))
    assert run_probe(setup, 10**13, cap=16).micro_batch == 5
    assert_same(before, everything(model))
    assert list(tmp_path.iterdir()) == []  # the snapshot file is gone


def test_a_real_optimizer_is_used_live_and_put_back(tmp_path):
    model = gpt2()
    optimizer = adamw(model)
    ids = torch.randint(0, 1024, (2, 16), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()  # Adam state for every parameter
    optimizer.zero_grad(set_to_none=True)
    for p in list(optimizer.state)[:3]:  # and a few parameters with none: made lazily, removed
        del optimizer.state[p]
    before, with_state = everything(model, optimizer), set(optimizer.state)
    made: list[torch.optim.Optimizer] = []
    setup = make_setup(model, seq_len=16, optimizer=optimizer, scratch_dir=str(tmp_path))
    setup.make_optimizer = lambda m: made.append(adamw(m)) or made[-1]
    P.run_trial(setup, CpuMemory(None), 2, 10**15)
    assert made == []  # the trial trained with the real optimizer, not a shadow
    assert_same(before, everything(model, optimizer))
    assert set(optimizer.state) == with_state  # lazily created entries removed again


def test_a_failing_trial_still_restores_and_removes_the_snapshot(tmp_path):
    model = gpt2()
    before = everything(model)

    def explode(m):
        raise ValueError("not an OOM")

    setup = make_setup(model, seq_len=16, scratch_dir=str(tmp_path))
    setup.make_optimizer = explode
    with pytest.raises(ValueError, match="not an OOM"):
        P.run_trial(setup, CpuMemory(None), 2, 10**15)
    assert_same(before, everything(model))
    assert list(tmp_path.iterdir()) == []


def test_the_trial_holds_the_weights_once():
    """A frozen base (as under PEFT): the weights are most of the memory. A trial's peak grows
    by the trainable part and the activations only; a copy would add the whole base again."""
    model = gpt2(n_embd=256, vocab=32768)  # 34 MB of weights, almost all frozen
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith("transformer.ln_f")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    setup = make_setup(model, seq_len=8, loss_chunk=8)
    meter = CpuMemory(None)
    P.run_trial(setup, meter, 1, 10**15)  # warm-up: first-call allocations of torch itself
    meter.release()
    base = rss_bytes()
    trial = P.run_trial(setup, meter, 1, 10**15)
    assert trial.ok and trial.peak_bytes - base < weights / 4


def test_trials_compute_the_chunked_loss(monkeypatch):
    calls: list[int] = []
    real = L.linear_cross_entropy

    def spy(*args, **kwargs):
        calls.append(kwargs["chunk"])
        return real(*args, **kwargs)

    monkeypatch.setattr(L, "linear_cross_entropy", spy)
    setup = make_setup(gpt2(), seq_len=16, loss_chunk=8)
    P.run_trial(setup, CpuMemory(None), 2, 10**15)
    # one forward per micro-batch: one-micro windows, then the last step's accumulating window
    assert calls == [8] * (T.TRIAL_STEPS - 1 + setup.micro_batches)
    calls.clear()
    P.run_trial(make_setup(gpt2(), seq_len=16), CpuMemory(None), 2, 10**15)
    assert calls == []  # loss_chunk None: the plain loss from full logits


def test_setup_from_config_uses_the_runs_loss_chunk(tmp_path):
    cfg = probe_config(tmp_path)
    model = gpt2(n_layer=1, n_embd=32, vocab=300)
    setup = P.setup_from_config(cfg, model, CPU)
    assert setup.spec.loss_chunk == L.auto_chunk(300) and setup.scratch_dir == cfg.run.output_dir
    cfg.train.loss_chunk = "off"
    assert P.setup_from_config(cfg, model, CPU).spec.loss_chunk is None


def test_a_trial_trains_the_step_fit_trains_on_packed_isolated_data(tmp_path):
    """The probe's trials run `fit`'s own StepSpec, document isolation included: with
    cross_doc_attention off, fit's batches carry restarting position ids and no attention
    mask (transformers then builds a per-document mask, which costs memory), so the trial's
    worst-case batch must too, or its peak is not training's."""
    cfg = probe_config(tmp_path)
    cfg.data.chunk.mode = "pack"
    cfg.data.chunk.cross_doc_attention = False
    model = gpt2(n_layer=1, n_embd=32, vocab=300)
    setup = P.setup_from_config(cfg, model, CPU)
    chunk = L.resolve_loss_chunk(cfg.train.loss_chunk, model, cfg.model.task).tokens
    assert setup.spec == StepSpec.from_config(cfg, chunk) and setup.spec.isolate_docs
    batch = T.worst_case_batch(setup, 3, model)
    half = cfg.data.chunk.seq_len // 2
    assert "attention_mask" not in batch  # as collate(isolate_docs=True) makes it
    expected = torch.cat([torch.arange(half), torch.arange(half)]).expand(3, -1)
    assert torch.equal(batch["position_ids"], expected)
    plain = T.worst_case_batch(make_setup(model, seq_len=cfg.data.chunk.seq_len), 3, model)
    assert set(plain) == {"input_ids", "attention_mask", "labels"}


@pytest.mark.cuda
def test_cuda_probe_trains_live_and_leaves_everything_bit_identical(monkeypatch):
    device = torch.device("cuda")
    model = gpt2(dropout=0.1).to(device)
    optimizer = adamw(model)
    ids = torch.randint(0, 1024, (2, 16), device=device)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    before = everything(model, optimizer)
    cuda_rng = torch.cuda.get_rng_state_all()
    monkeypatch.setenv("LLMTRAIN_FAULT_OOM_MICRO", "5")
    setup = P.TrialSetup(
        model=model,
        make_optimizer=adamw,
        seq_len=32,
        device=device,
        optimizer=optimizer,
        spec=StepSpec("causal-lm", "tokens", "fp32", grad_clip=1.0, loss_chunk=64),
    )
    result = P.probe_micro_batch(setup, CudaMemory(device), global_batch=16, max_micro=16)
    assert result.micro_batch == 5
    assert_same(before, everything(model, optimizer))
    after = torch.cuda.get_rng_state_all()
    assert all(torch.equal(a, b) for a, b in zip(cuda_rng, after, strict=True))


def test_with_accumulation_the_trial_holds_the_gradients_during_a_forward():
    """Training with k > 1 runs micro-batch 2's forward while micro-batch 1's gradients are
    held: the trial's last window does the same. With activations larger than the gradients
    (as at any micro-batch worth probing) its peak is higher by about the gradients' size."""
    model = gpt2(n_embd=256, vocab=32768)
    grads = sum(p.numel() * p.element_size() for p in model.parameters())
    meter = CpuMemory(None)
    peaks = {}
    for k in (1, 2, 1, 2):  # twice each: the first call of each warms up
        setup = make_setup(model, seq_len=64, loss_chunk=64, micro_batches=k)
        peaks[k] = P.run_trial(setup, meter, 24, 10**15).peak_bytes
    assert peaks[2] - peaks[1] > grads / 2


def test_the_search_accumulates_in_trials_exactly_when_training_will(monkeypatch):
    seen: dict[int, int] = {}
    real = T.run_trial

    def spy(setup, backend, m, budget, live=None):
        seen[m] = setup.micro_batches
        return real(setup, backend, m, budget, live)

    monkeypatch.setattr(P.search, "run_trial", spy)
    P.probe_micro_batch(make_setup(gpt2(), seq_len=16), CpuMemory(10**13), global_batch=6)
    assert seen[6] == 1  # m = 6 is the whole window: k = 1
    assert all(k == 2 for m, k in seen.items() if m < 6) and len(seen) > 1


def test_a_trial_over_the_budget_is_stopped_there_and_leaves_everything_as_it_was():
    """A failing trial costs the budget, not its whole peak (so `micro_batch: auto` needs no
    more memory than the answer set by hand); its verdict is the one the full trial gives."""
    model = gpt2(n_embd=128, vocab=2048)  # activations dominate: the head's buffers are small
    setup = make_setup(model, seq_len=128, loss_chunk=64)
    meter = CpuMemory(None)
    P.run_trial(setup, meter, 1, 10**15)  # warm-up
    small = P.run_trial(setup, meter, 1, 10**15).peak_bytes
    full = P.run_trial(setup, meter, 32, 10**15).peak_bytes
    budget = small + (full - small) // 4
    before = everything(model)
    stopped = P.run_trial(setup, meter, 32, budget)
    assert not stopped.ok and "trial stopped" in stopped.error
    # over the budget by at most one module's (or the chunked head's) allocations
    assert stopped.peak_bytes < small + (full - small) // 2, (small, budget, stopped, full)
    assert_same(before, everything(model))
    assert P.run_trial(setup, meter, 1, budget).ok  # the guard is gone with the trial


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_a_trial_stopped_in_its_backward_leaves_nothing_of_it_alive(monkeypatch, device):
    """torch's autograd engine keeps a backward that raised alive until the next backward;
    the probe drops it, or training after the probe runs beside the stopped trial's
    activations (docs/benchmarks.md: 1.45x the peak of the same run set by hand). On CUDA the
    allocator's own count shows it too (the GPU one-shot runs this)."""
    dev = torch.device(device)
    setup = make_setup(gpt2(n_layer=2).to(dev), seq_len=32, loss_chunk=64)
    setup.device = dev
    meter = CudaMemory(dev) if dev.type == "cuda" else CpuMemory(None)
    assert P.run_trial(setup, meter, 2, 10**15).ok
    before = graph_tensors(), torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
    monkeypatch.setenv("LLMTRAIN_FAULT_OOM_MICRO", "2")
    monkeypatch.setenv("LLMTRAIN_FAULT_OOM_IN", "backward")
    stopped = P.run_trial(setup, meter, 4, 10**15)
    assert not stopped.ok and "simulated out of memory" in stopped.error
    after = graph_tensors(), torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
    assert after == before
