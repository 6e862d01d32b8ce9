"""Probe (docs/architecture.md, "Probing"; issue #5): tight against a brute-force scan,
harmless to the real state, honest about errors, cached. CPU only: peaks are the process's
measured VmHWM."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from probe_helpers import (
    CPU,
    adamw,
    gpt2,
    make_setup,
    probe_config,
    run_probe,
)
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
)

from llmtrain import probe as P
from llmtrain.host import allocator
from llmtrain.probe import search
from llmtrain.probe.cache import cache_key
from llmtrain.probe.memory import CpuMemory, rss_bytes

pytestmark = pytest.mark.usefixtures("probe_measurement")


def checkpointing(model: torch.nn.Module) -> None:
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


# ------------------------------------------------------------------------ the search alone
@pytest.mark.parametrize(
    ("base", "per_sample", "curve", "budget", "peaks_on_fail"),
    [
        (100, 7, 0.0, 100 + 7 * 37, True),
        (1000, 3, 0.0, 1000 + 3 * 150, False),  # CUDA-like: an OOM reports no peak
        (50, 10, 0.02, 50 + 10 * 60 + 0.02 * 60**2, True),  # activations grow faster than m
        (500, 1, 0.0, 500 + 1 * 3000, True),  # far above the first guesses
        (0, 40, 0.0, 40 * 21 + 39, False),
    ],
)
def test_search_is_tight_and_bounded_on_synthetic_peaks(
    base, per_sample, curve, budget, peaks_on_fail
):
    def peak(m: int) -> int:
        return int(base + per_sample * m + curve * m * m)

    def trial(m: int) -> P.Trial:
        ok = peak(m) <= budget
        return P.Trial(m, ok, peak(m) if ok or peaks_on_fail else None, 0.0)

    cap = 4096
    truth = max(m for m in range(1, cap + 1) if peak(m) <= budget)
    answer, trials = P.search_micro_batch(trial, cap=cap, budget=budget)
    assert 0.9 * truth <= answer <= truth
    assert len(trials) <= 2 * math.ceil(math.log2(truth)) + 4
    assert all(t.ok for t in trials if t.micro_batch == answer)


def test_search_respects_the_cap_and_reports_zero_when_nothing_fits():
    def fits_all(m):
        return P.Trial(m, True, 10 * m, 0.0)

    answer, trials = P.search_micro_batch(fits_all, cap=48, budget=10**9)
    assert answer == 48 and max(t.micro_batch for t in trials) == 48

    answer, trials = P.search_micro_batch(lambda m: P.Trial(m, False, None, 0.0), cap=64, budget=1)
    assert answer == 0 and [t.micro_batch for t in trials] == [1]


def test_a_candidate_the_peaks_put_clearly_over_the_budget_is_not_run():
    """The QLoRA benchmark's shape (docs/benchmarks.md): 180 MiB per sequence over 580 MiB, a
    budget of 1,843 MiB, so 7 passes (1,840) and 8 (2,020) is 10% over. After 1, 2 and the
    guess 7, the candidate 8 is predicted, not run: a run of it is what made `auto` cost
    more than the answer by hand. A candidate only just over the budget is run."""
    ran: list[int] = []

    def trial(m: int, per: int) -> P.Trial:
        ran.append(m)
        peak = 580 + per * m
        return P.Trial(m, peak <= 1843, peak, 0.0)

    answer, trials = P.search_micro_batch(lambda m: trial(m, 180), cap=16, budget=1843)
    assert answer == 7 and ran == [1, 2, 7]
    assert [(t.micro_batch, t.predicted, t.ok) for t in trials][-1] == (8, True, False)
    assert trials[-1].peak_bytes is None and "not run" in trials[-1].error

    ran.clear()  # per 157: 7 peaks 1,679, 8 peaks 1,836 (ok), 9 1,993: 8% over, not run
    answer, trials = P.search_micro_batch(lambda m: trial(m, 157), cap=16, budget=1843)
    assert answer == 8 and 9 not in ran and trials[-1].predicted
    ran.clear()  # per 158: 8 peaks 1,844, over by 1 (< 2%): measured, not predicted
    answer, trials = P.search_micro_batch(lambda m: trial(m, 158), cap=16, budget=1843)
    assert answer == 7 and 8 in ran and not any(t.predicted for t in trials)


def test_clearly_over_takes_the_smallest_measured_slope_and_needs_two_peaks():
    ok = [P.Trial(1, True, 100, 0.0), P.Trial(2, True, 200, 0.0), P.Trial(6, True, 400, 0.0)]
    # slopes to 6: 60 from 1, 50 from 2 -> bound at 8 is 400 + 2 * 50 = 500
    assert search.clearly_over(ok, 8, budget=485) == 500  # 500 > 1.02 * 485
    assert search.clearly_over(ok, 8, budget=495) is None  # 500 < 1.02 * 495
    assert search.clearly_over(ok[:1], 8, budget=10) is None  # one peak: no slope
    flat = [P.Trial(1, True, 100, 0.0), P.Trial(2, True, 100, 0.0)]
    assert search.clearly_over(flat, 3, budget=50) is None  # no growth measured: run it


def test_a_predicted_trial_is_shown_as_predicted_and_survives_the_cache():
    from rich.console import Console

    from llmtrain.commands.probe import render_table

    trials = [P.Trial(1, True, 700 * 2**20, 1.0), P.Trial(2, True, 900 * 2**20, 1.0)]
    trials.append(search._not_run(3, 1200 * 2**20, 1000 * 2**20))
    result = P.ProbeResult(2, 8, 16, 256, "cpu: cpu", 2**31, 900 * 2**20, 0.1, trials)
    again = P.ProbeResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert [t.predicted for t in again.trials] == [False, False, True]
    console = Console(record=True, width=120)
    console.print(render_table(again))
    rows = console.export_text().splitlines()
    assert any("over (predicted)" in r and r.split()[1] == "3" for r in rows), rows


# --------------------------------------------------------------------- measured, on CPU
def test_cpu_backend_measures_a_real_allocation():
    backend = CpuMemory(None)
    backend.release()  # measure() trims the heap first: take the baseline after the same trim
    before = rss_bytes()
    _, measured = backend.measure(lambda: float(torch.ones(16 * 2**20).sum()))  # 64 MiB
    assert measured.peak_bytes - before >= 60 * 2**20
    assert backend.capacity() > rss_bytes()  # default: RSS + a share of MemAvailable


def llama_ckpt() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=8192,
        max_position_embeddings=128,
    )
    model = LlamaForCausalLM(cfg)
    checkpointing(model)
    return model


def bert_wide() -> BertForSequenceClassification:
    torch.manual_seed(0)
    cfg = BertConfig(
        num_hidden_layers=2,
        hidden_size=128,
        num_attention_heads=8,
        intermediate_size=512,
        vocab_size=1024,
        max_position_embeddings=128,
        num_labels=3,
        pad_token_id=0,
        attn_implementation="eager",  # materialized attention: MBs per sequence
    )
    return BertForSequenceClassification(cfg)


# Shapes whose peak grows by several MB per sequence (big vocabularies, small compute), so
# one sequence is well above the ~1 MB run-to-run drift of a process's peak RSS (gpt2-fp32:
# vocabulary 16,384, since at 8,192 half a sequence was once within that drift in a CI run).
SHAPES = {
    # name: (model factory, TrialSetup kwargs, target true maximum)
    "gpt2-fp32": (lambda: gpt2(n_embd=32, vocab=16384), {"seq_len": 64}, 24),
    "bert-cls": (bert_wide, {"seq_len": 128, "task": "sequence-classification"}, 22),
    "llama-ckpt": (llama_ckpt, {"seq_len": 64}, 26),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_probe_against_brute_force_scan(shape):
    make, kw, target = SHAPES[shape]
    setup = make_setup(make(), **kw)
    meter = CpuMemory(None)
    # Put the budget half a sequence above the measured peak at `target`, so the true
    # maximum is about `target` and no measurement sits right on the boundary.
    p1, p2, pt = (P.run_trial(setup, meter, m, 10**15).peak_bytes for m in (1, 2, target))
    budget = pt + (p2 - p1) // 2
    margin = 0.1
    limit = math.ceil(budget / (1 - margin))

    result = run_probe(setup, limit, margin=margin)
    assert result.budget_bytes == int((1 - margin) * limit)
    answer = result.micro_batch

    # Brute force with the same measurement and pass rule, every m from the smallest that
    # would break the 90% promise down to the first that passes: that is the true maximum
    # (peaks grow with m, so nothing above a failing run of m passes).
    top = math.floor(answer / 0.9) + 1
    scan: dict[int, bool] = {}
    for m in range(top, 0, -1):
        scan[m] = P.run_trial(setup, meter, m, result.budget_bytes).ok
        if scan[m]:
            break
    truth = max(m for m, ok in scan.items() if ok)
    assert truth < top, f"m={top} passes: the answer {answer} is under 90% of the maximum"
    assert 20 <= truth <= 200
    assert 0.9 * truth <= answer <= truth, (answer, truth, scan)
    assert len(result.trials) <= 2 * math.ceil(math.log2(truth)) + 4
    chosen = [t for t in result.trials if t.micro_batch == answer]
    assert chosen and all(t.ok and t.peak_bytes <= result.budget_bytes for t in chosen)
    assert result.grad_accum == math.ceil(256 / answer)


# ------------------------------------------------------------------------ harmlessness
def _snapshot(model, optimizer):
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        {
            (i, k): (v.clone() if torch.is_tensor(v) else v)
            for i, st in enumerate(optimizer.state.values())
            for k, v in st.items()
        },
    )


def test_probe_leaves_weights_optimizer_rng_and_data_untouched(monkeypatch):
    model = gpt2(dropout=0.1)  # dropout: the trials draw from the global RNG
    optimizer = adamw(model)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):  # real steps, so Adam state exists and must survive the probe
        ids = torch.randint(0, 1024, (2, 16), generator=gen)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    data = iter(torch.utils.data.RandomSampler(range(1000)))
    first = next(data)
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    weights, opt_state = _snapshot(model, optimizer)
    rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())

    monkeypatch.setenv("LLMTRAIN_FAULT_OOM_MICRO", "5")  # a short search, OOMs included
    setup = make_setup(model, seq_len=32, optimizer=optimizer)
    result = run_probe(setup, 10**13, cap=16)
    assert result.micro_batch == 5

    weights2, opt_state2 = _snapshot(model, optimizer)
    assert weights.keys() == weights2.keys()
    assert all(torch.equal(weights[k], weights2[k]) for k in weights)
    assert opt_state.keys() == opt_state2.keys() and len(opt_state) > 0
    for k, v in opt_state.items():
        assert torch.equal(v, opt_state2[k]) if torch.is_tensor(v) else v == opt_state2[k]
    assert all(p.grad is None for p in model.parameters())
    assert random.getstate() == rng[0]
    np_state = np.random.get_state()
    assert np_state[0] == rng[1][0] and np.array_equal(np_state[1], rng[1][1])
    assert torch.equal(torch.get_rng_state(), rng[2])
    # data position: the sampler continues exactly where it was
    torch.manual_seed(7)
    twin = iter(torch.utils.data.RandomSampler(range(1000)))
    assert next(twin) == first
    assert [next(data) for _ in range(5)] == [next(twin) for _ in range(5)]


def test_fault_hook_at_8_makes_the_probe_answer_exactly_8(monkeypatch):
    monkeypatch.setenv("LLMTRAIN_FAULT_OOM_MICRO", "8")
    # fp16: autocast + GradScaler in the trials too
    result = run_probe(make_setup(gpt2(), seq_len=16, precision="fp16"), 10**13, cap=64)
    assert result.micro_batch == 8
    assert result.grad_accum == 8
    failed = [t for t in result.trials if not t.ok]
    assert failed and all(t.micro_batch > 8 and "simulated" in t.error for t in failed)
    # the rank filter: a fault aimed at rank 1 does not touch rank 0
    monkeypatch.setenv("LLMTRAIN_FAULT_OOM_RANK", "1")
    assert run_probe(make_setup(gpt2(), seq_len=16), 10**13, cap=12).micro_batch == 12


class Exploding(GPT2LMHeadModel):
    def forward(self, *args, **kwargs):
        if kwargs["input_ids"].shape[0] > 2:
            raise ValueError("not an OOM: bad shapes at micro 3")
        return super().forward(*args, **kwargs)


def test_non_oom_error_in_a_trial_propagates_unchanged():
    torch.manual_seed(0)
    model = Exploding(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=256, n_positions=64))
    rng = torch.get_rng_state()
    with pytest.raises(ValueError, match=r"^not an OOM: bad shapes at micro 3$"):
        run_probe(make_setup(model, seq_len=16), 10**13, cap=64)
    assert torch.equal(torch.get_rng_state(), rng)


def test_oom_that_is_real_on_cpu_is_a_failed_trial_and_its_memory_is_released():
    import weakref

    optimizers: weakref.WeakSet = weakref.WeakSet()  # the trials' own: they die with the trial

    class Hungry(GPT2LMHeadModel):
        def forward(self, *args, **kwargs):
            if kwargs["input_ids"].shape[0] > 3:
                raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried ...")
            return super().forward(*args, **kwargs)

    def tracked_adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
        optimizer = adamw(model)
        optimizers.add(optimizer)
        return optimizer

    class Meter(CpuMemory):
        """Records how many trial optimizers are still alive when memory is released."""

        seen: list[int] = []  # noqa: RUF012

        def release(self, collect: bool = False) -> None:
            super().release(collect)
            if collect:
                self.seen.append(len(optimizers))

    torch.manual_seed(0)
    model = Hungry(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=256, n_positions=64))
    setup = P.TrialSetup(model=model, make_optimizer=tracked_adamw, device=CPU, seq_len=16)
    result = P.probe_micro_batch(setup, Meter(10**13), global_batch=64)
    assert result.micro_batch == 3
    assert "can't allocate memory" in next(t.error for t in result.trials if not t.ok)
    # after an OOM the failed trial's optimizer — its state, and the frames holding the
    # activations — is already gone when memory is released (CUDA: empty_cache can only
    # return what nothing references any more)
    assert Meter.seen and all(n == 0 for n in Meter.seen)
    assert all(p.grad is None for p in model.parameters())


# ------------------------------------------------------------------ config, cache, CLI
def test_resolve_micro_batch_probes_then_hits_the_cache_then_misses_on_seq_len(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("LLMTRAIN_FAULT_OOM_MICRO", "8")
    cfg = probe_config(tmp_path, probe={"memory_limit": "1TiB", "max_micro": 32})
    model = gpt2(n_layer=1, n_embd=32, vocab=300)
    plan = P.resolve_micro_batch(cfg, model, CPU)
    assert (plan.micro_batch, plan.grad_accum, int(plan)) == (8, 8, 8)
    assert plan.probe is not None and not plan.probe.cached and plan.probe.trials
    assert (tmp_path / "run" / P.CACHE_FILE).is_file()

    def no_trials(*a, **k):
        raise AssertionError("a cache hit must not run trials")

    monkeypatch.setattr(search, "run_trial", no_trials)
    again = P.resolve_micro_batch(cfg, model, CPU)
    assert again.micro_batch == 8 and again.probe.cached
    assert [t.micro_batch for t in again.probe.trials] == [t.micro_batch for t in plan.probe.trials]

    longer = cfg.model_copy(deep=True)
    longer.data.chunk.seq_len = 48
    with pytest.raises(AssertionError, match="cache hit must not run trials"):
        P.resolve_micro_batch(longer, model, CPU)  # a miss: it probes
    off = cfg.model_copy(deep=True)
    off.batch.probe.cache = False
    with pytest.raises(AssertionError, match="cache hit must not run trials"):
        P.resolve_micro_batch(off, model, CPU)


def test_resolve_micro_batch_with_an_integer_never_probes(tmp_path, monkeypatch):
    monkeypatch.setattr(search, "run_trial", lambda *a, **k: pytest.fail("probed"))
    cfg = probe_config(tmp_path, micro_batch=6)
    plan = P.resolve_micro_batch(cfg, gpt2(n_layer=1, n_embd=32), CPU, world_size=2)
    assert (plan.micro_batch, plan.grad_accum, plan.probe) == (6, math.ceil(64 / 12), None)


def test_cli_probe_batch_json_prints_one_object_with_the_contract_keys(tmp_path, monkeypatch):
    cli = pytest.importorskip("llmtrain.cli")
    from typer.testing import CliRunner

    (tmp_path / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    cfg = probe_config(tmp_path, probe={"memory_limit": "1TiB", "max_micro": 8})
    yaml_path = tmp_path / "cfg.yaml"
    import yaml

    yaml_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_unset=True)))
    monkeypatch.setenv("LLMTRAIN_FAULT_OOM_MICRO", "4")
    res = CliRunner().invoke(cli.app, ["probe-batch", str(yaml_path), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    for key in (
        "micro_batch", "grad_accum", "global_batch", "seq_len", "device",
        "capacity_bytes", "peak_bytes", "margin", "trials",
    ):  # fmt: skip
        assert key in out
    assert (out["micro_batch"], out["grad_accum"], out["global_batch"]) == (4, 16, 64)
    assert out["seq_len"] == 32 and out["capacity_bytes"] == 2**40
    for t in out["trials"]:
        assert {"micro_batch", "ok", "peak_bytes", "seconds", "tokens_per_s"} <= t.keys()
    # measured under the allocator `fit` trains with, and cached for that one only
    (entry,) = json.loads((tmp_path / "run" / P.CACHE_FILE).read_text())["entries"].values()
    policy = allocator.resolve(cfg.run.cpu_allocator)
    assert entry["key"]["cpu_allocator"].split()[0] == policy, entry["key"]
    allocator.revert()


def test_a_probe_under_one_cpu_allocator_is_not_reused_under_another(tmp_path, monkeypatch):
    """Under `retain` the heap keeps what each sequence freed: a measurement under `system`
    (or a probe on its own) would let `fit` train a micro-batch the budget cannot hold."""
    cfg = probe_config(tmp_path)
    model = gpt2(n_layer=1, n_embd=32, vocab=300)
    keys = []
    for policy in (allocator.Policy("retain", True, ""), allocator.Policy("system", False, "")):
        monkeypatch.setattr(allocator, "current", lambda policy=policy: policy)
        keys.append(cache_key(cfg, model, CPU, 1, memory_limit=2**31))
    assert keys[0]["cpu_allocator"] != keys[1]["cpu_allocator"]
    assert keys[0] | {"cpu_allocator": None} == keys[1] | {"cpu_allocator": None}


@pytest.mark.parametrize(
    "change",
    [
        {"model": {"attn_implementation": "eager"}},  # attention probabilities held
        {"model": {"compile": True}},
        {"model": {"activation_offload": True, "gradient_checkpointing": True}},
        {"train": {"parallel": "fsdp"}},
    ],
)
def test_the_cache_key_sees_what_changes_a_sequence_s_cost(tmp_path, change):
    """Settings that change the memory a trial measures, where the model alone does not show
    them (a cached sdpa answer reused under eager attention would not fit)."""
    cfg = probe_config(tmp_path)
    data = cfg.model_dump()
    for section, values in change.items():
        data[section].update(values)
    other = type(cfg).model_validate(data)
    model = gpt2(n_layer=1, n_embd=32, vocab=300)
    key = cache_key(cfg, model, CPU, 1, memory_limit=None)
    assert key != cache_key(other, model, CPU, 1, memory_limit=None)


@pytest.mark.parametrize("failure", ["oom", "over_budget"])
def test_search_is_exact_and_short_for_every_limit(failure):
    """Every limit 1..300 with global 256 (cap 256): the answer is the true maximum, in at most
    2·log2(answer) + 4 trials. "oom": failures carry no peak and the budget is far away (the
    limit is an OOM the peaks do not explain: LLMTRAIN_FAULT_OOM_MICRO); the old search walked
    down from the bracket's edge (limit 13: 12 trials, 1 2 256 255 22 21 6 20 10 19 14 13)."""
    for limit in range(1, 301):
        budget = 10**12 if failure == "oom" else 1000 + 37 * limit + 20

        def trial(m: int, limit=limit, budget=budget) -> P.Trial:
            peak = 1000 + 37 * m
            ok = m <= limit if failure == "oom" else peak <= budget
            return P.Trial(m, ok, peak if ok else None, 0.0)

        answer, trials = P.search_micro_batch(trial, cap=256, budget=budget)
        truth = min(limit, 256)
        assert answer == truth, (limit, [t.micro_batch for t in trials])
        assert len(trials) <= 2 * math.log2(max(truth, 2)) + 4, (limit, len(trials))


def test_static_bytes_count_each_tensor_at_its_real_size():
    """Frozen bf16 weights count 2 bytes and no gradient or state; trainable fp32 ones 4 + 4
    for the gradient + the optimizer's state (adamw: 8; adamw8bit: 2 + block scales)."""
    from llmtrain.engine.optim import optimizer_state_bytes
    from llmtrain.probe.trial import static_bytes

    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 64))
    model[0].requires_grad_(False)
    model[0].to(torch.bfloat16)
    frozen = sum(p.numel() for p in model[0].parameters())
    trained = sum(p.numel() for p in model[1].parameters())
    assert static_bytes(model, "adamw") == 2 * frozen + (4 + 4 + 8) * trained
    w, b = 128 * 64, 64  # adamw8bit: the 8192-element weight in 8 bits, the bias in fp32
    state8 = 2 * (w + 4 * (w // 256)) + 2 * 4 * b
    assert optimizer_state_bytes("adamw8bit", model) == state8
    assert static_bytes(model, "adamw8bit") == 2 * frozen + 8 * trained + state8
