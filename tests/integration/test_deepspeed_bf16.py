"""bf16 under DeepSpeed: its bf16 optimizer at ZeRO stage 0 and 1 (`runs_bf16_optimizer`).

What it buys, checked on CPU (bf16 runs here too): the micro batches' gradients add up in fp32
rather than in bf16, the optimizer step reads the device a couple of times rather than once per
parameter and launches a few operators per parameter rather than dozens, and its checkpoints
export, and resume only under the precision that saved them.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pretrain.config import ConfigError
from tests.integration.test_trainer import make_config, train

BF16 = ("deepspeed.precision=bf16", "trainer.eval_every=0", "model.hidden_dropout_prob=0.0")


def trainer_for(corpus: dict, run_dir: Path, *extra: str):
    from pretrain.trainer import Trainer

    return Trainer(make_config(corpus, run_dir, *BF16, *extra))


class Ops(TorchDispatchMode):
    """Operators (views aside) and device reads dispatched inside it."""

    VIEWS = {"view", "_unsafe_view", "t", "detach", "slice", "alias", "as_strided", "select"}

    def __init__(self) -> None:
        super().__init__()
        self.count: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func.overloadpacket.__name__
        if name not in self.VIEWS:
            self.count["ops"] += 1
        if name == "_local_scalar_dense":  # .item(), bool(tensor), float(tensor)
            self.count["reads"] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "setup",
    [("deepspeed=zero0",), ("deepspeed=zero1",),
     ("deepspeed=zero0", "+deepspeed.extra.data_types.grad_accum_dtype=fp32")],
    ids=["zero0", "zero1", "zero0_fp32_said"],
)  # fmt: skip
def test_bf16_accumulates_the_micro_batches_gradients_in_fp32(
    setup: tuple[str, ...], tiny_corpus: dict, tmp_path: Path
) -> None:
    from pretrain.models.rtd import RTDModel, masked_rows_of

    trainer = trainer_for(tiny_corpus, tmp_path / "run", *setup)
    engine = trainer.engine
    assert type(engine.optimizer).__name__ == "BF16_Optimizer"
    assert engine.batch.accumulation == 2
    batches = iter(trainer.data.train)
    micro = [next(batches), next(batches)]
    params = [p for p in engine.module.parameters() if p.requires_grad]
    assert all(p.dtype == torch.bfloat16 for p in params)
    # Reference: each micro batch's bf16 gradient of loss / 2 (DeepSpeed's scaling for two
    # accumulation steps) on a copy of the model (DeepSpeed's gradient hooks would fire for
    # autograd on its own), added up in fp32.
    reference = RTDModel(trainer.config.model, trainer.config.rtd).to(torch.bfloat16)
    reference.load_state_dict(engine.module.state_dict())
    ref_params = [p for p in reference.parameters() if p.requires_grad]
    grads = []
    for b in micro:
        out = reference(
            b["input_ids"], b["attention_mask"], b["labels"],
            sampling_noise=b["sampling_noise"], masked_rows=masked_rows_of(b["labels"]),
        )  # fmt: skip
        each = torch.autograd.grad(out.loss / 2, ref_params, allow_unused=True)
        pairs = zip(each, ref_params, strict=True)
        grads.append([torch.zeros_like(p) if g is None else g for g, p in pairs])
    fp32_sum = [a.float() + b.float() for a, b in zip(*grads, strict=True)]
    # As the trainer runs it: backward and step per micro batch, the second step updates.
    engine.backward_and_step(engine.forward(micro[0]).loss)
    engine.engine.backward(engine.forward(micro[1]).loss)
    # The fp32 gradient buffers the optimizer's step reads, after the backward's all-reduce.
    optimizer = engine.engine.optimizer
    buffer = {
        id(lp): hp
        for lps, hps in zip(optimizer.bf16_groups, optimizer.fp32_groups_gradients, strict=True)
        for lp, hp in zip(lps, hps, strict=True)
    }
    for p, want in zip(params, fp32_sum, strict=True):
        got = buffer[id(p)].view_as(p)
        assert got.dtype == torch.float32 and torch.equal(got, want), tuple(p.shape)
    # Summing or all-reducing in bf16 (DeepSpeed's defaults) would round: the test can tell.
    bf16_sum = [(a + b).float() for a, b in zip(*grads, strict=True)]
    assert sum(not torch.equal(a, b) for a, b in zip(bf16_sum, fp32_sum, strict=True)) > 10
    # And the step clips by the norm of that mean gradient.
    engine.engine.step()
    want_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in fp32_sum]))
    assert engine.grad_norm() == pytest.approx(float(want_norm), rel=1e-5)


@pytest.mark.parametrize("stage", [0, 1])
def test_the_bf16_optimizer_step_reads_the_device_twice_not_once_per_parameter(
    stage: int, tiny_corpus: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On a GPU each read waits for the queued work and each operator is a launch the host must
    # issue. DeepSpeed's stage-0 bf16 wrapper read once per parameter (its overflow check) and
    # its ZeRO-1 optimizer launched ~16 operators per parameter; AdamW fused, as on a GPU.
    import pretrain.engine

    monkeypatch.setattr(pretrain.engine, "fused_adamw", lambda device: True)
    trainer = trainer_for(tiny_corpus, tmp_path / "run", f"deepspeed=zero{stage}")
    engine = trainer.engine
    batches = iter(trainer.data.train)
    n_params = sum(1 for p in engine.module.parameters() if p.requires_grad)

    def step(ops: Ops | None = None) -> None:
        for _ in range(engine.batch.accumulation):
            loss = engine.forward(next(batches)).loss
            if ops is None:
                engine.backward_and_step(loss)
            else:
                with ops:
                    engine.backward_and_step(loss)

    step()  # the first step builds the optimizer's state
    ops = Ops()
    step(ops)
    # The norm's finiteness check and the clipping's comparison.
    assert ops.count["reads"] <= 2, ops.count
    # Two micro batches' backward (+ fp32 accumulation hooks) and the step: about 12 ops per
    # parameter here; DeepSpeed's other bf16 paths took over 30.
    assert ops.count["ops"] < 16 * n_params, (ops.count, n_params)


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_a_bf16_checkpoint_exports_its_fp32_master_weights(
    stage: int, tiny_corpus: dict, tmp_path: Path
) -> None:
    # DeepSpeed names every bf16 run's partition files alike; only its bf16 optimizer's (stage
    # 0 and 1 here) are gathered by us, the ZeRO optimizers' (2, 3) by zero_to_fp32.
    from deepspeed.utils import safe_get_full_fp32_param

    from pretrain.engine import saved_by_bf16_optimizer
    from pretrain.export import read_deepspeed_weights

    trainer = trainer_for(
        tiny_corpus, tmp_path / "run", "trainer.max_steps=2", f"deepspeed=zero{stage}"
    )
    trainer.fit()
    live = {
        name: safe_get_full_fp32_param(p) for name, p in trainer.engine.module.named_parameters()
    }
    step_dir = tmp_path / "run/checkpoints/step_00000002"
    assert list(step_dir.glob("bf16_zero_pp_rank_0_*_optim_states.pt"))
    assert saved_by_bf16_optimizer(step_dir) == (stage < 2)
    read = read_deepspeed_weights(step_dir)
    assert set(read) == set(live)
    for name, want in live.items():
        assert read[name].dtype == torch.float32 and torch.equal(read[name], want), name
    if stage < 3:  # the masters keep what bf16 rounds away (ZeRO-3's module is partitioned)
        module = dict(trainer.engine.module.named_parameters())
        assert any(not torch.equal(read[n], module[n].float()) for n in read)


def test_resuming_under_another_precision_is_refused_in_one_line(
    tiny_corpus: dict, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    train(tiny_corpus, run, "trainer.max_steps=2", "trainer.eval_every=0")  # fp32 on CPU
    with pytest.raises(ConfigError) as refused:
        train(tiny_corpus, run, *BF16, "trainer.max_steps=3")
    message = str(refused.value)
    assert "\n" not in message
    assert (
        "its checkpoint holds DeepSpeed's optimizer state for fp32 at ZeRO stage 0, this run's "
        "would be for bf16 at ZeRO stage 1 (deepspeed.precision=bf16 on cpu); resume with the "
        "precision it was saved with (deepspeed.precision=fp32)"
    ) in message
    resumed = train(tiny_corpus, run, "trainer.max_steps=3", "trainer.eval_every=0")
    assert [r["step"] for r in resumed] == [3]


@pytest.mark.parametrize(
    "saved, resumed, said",
    [
        (("deepspeed.precision=bf16", "+deepspeed.extra.data_types.grad_accum_dtype=bf16"),
         ("deepspeed.precision=bf16",),
         "for bf16 at ZeRO stage 0, this run's would be for bf16 at ZeRO stage 1 (deepspeed."
         "precision=bf16 on cpu); resume with +deepspeed.extra.data_types.grad_accum_dtype=bf16"),
        (("deepspeed.precision=fp32",), ("deepspeed.precision=bf16",),
         "for fp32 at ZeRO stage 0, this run's would be for bf16 at ZeRO stage 1 (deepspeed."
         "precision=bf16 on cpu); resume with the precision it was saved with (deepspeed."
         "precision=fp32)"),
        (("deepspeed.precision=fp32", "deepspeed=zero1"),
         ("deepspeed.precision=bf16", "deepspeed=zero1"),
         "for fp32 at ZeRO stage 1-3, this run's would be for bf16 at ZeRO stage 1"),
        (("deepspeed.precision=fp32", "deepspeed=zero3"),  # its model file has another name
         ("deepspeed.precision=bf16", "deepspeed=zero3"),
         "for fp32 at ZeRO stage 1-3, this run's would be for bf16 at ZeRO stage 3"),
    ],
    ids=["bf16_stage0_wrapper", "fp32_to_bf16", "fp32_zero1_to_bf16", "fp32_zero3_to_bf16"],
)  # fmt: skip
def test_a_checkpoint_of_before_the_layout_was_recorded_says_how_to_resume_it(
    saved: tuple[str, ...], resumed: tuple[str, ...], said: str, tiny_corpus: dict,
    tmp_path: Path,
) -> None:  # fmt: skip
    # Its precision and partitioning are read from its files (a CPU run continued on a GPU,
    # where auto means bf16, is the common case); DeepSpeed would fail deep inside its load.
    from pretrain.checkpoint import MANIFEST, TRAINER_STATE, manifest

    run = tmp_path / "run"
    common = ("trainer.eval_every=0", "model.hidden_dropout_prob=0.0")
    train(tiny_corpus, run, *common, *saved, "trainer.max_steps=2")
    step_dir = run / "checkpoints/step_00000002"
    state = json.loads((step_dir / TRAINER_STATE).read_text())
    del state["deepspeed"]
    (step_dir / TRAINER_STATE).write_text(json.dumps(state))  # as saved before it was recorded
    (step_dir / MANIFEST).write_text(json.dumps(manifest(step_dir)))
    with pytest.raises(ConfigError) as refused:
        train(tiny_corpus, run, *common, *resumed, "trainer.max_steps=3")
    assert said in str(refused.value) and "\n" not in str(refused.value)
    again = train(tiny_corpus, run, *common, *saved, "trainer.max_steps=3")
    assert [r["step"] for r in again] == [3]


def test_a_bf16_run_resumes_exactly(tiny_corpus: dict, tmp_path: Path) -> None:
    # The bf16 optimizer's flat fp32 masters, AdamW's state over them and the fp32 gradient
    # sums all come back: the resumed run's numbers are the straight run's, bit for bit.
    from tests.integration.test_trainer import numbers

    common = (*BF16, "trainer.max_steps=4", "model.hidden_dropout_prob=0.1")
    straight = train(tiny_corpus, tmp_path / "straight", *common)
    first = train(tiny_corpus, tmp_path / "staged", *common, until_step=2)
    second = train(tiny_corpus, tmp_path / "staged", *common)
    assert [r["step"] for r in second] == [3, 4]
    assert numbers(first + second) == numbers(straight)
    assert len({r["loss"] for r in straight}) == 4


def test_which_settings_run_the_bf16_optimizer(tiny_corpus: dict, tmp_path: Path) -> None:
    from pretrain.engine import runs_bf16_optimizer

    def runs(*overrides: str, precision: str = "bf16") -> bool:
        return runs_bf16_optimizer(make_config(tiny_corpus, tmp_path, *overrides), precision)

    assert runs("deepspeed=zero0") and runs("deepspeed=zero1")
    assert not runs("deepspeed=zero2") and not runs("deepspeed=zero3")
    assert not runs("deepspeed=zero0", precision="fp32")
    assert not runs("deepspeed=zero0", precision="fp16")
    for fp32 in ("fp32", "float32", "float", "torch.float32"):  # DeepSpeed's spellings
        assert runs("deepspeed=zero0", f"+deepspeed.extra.data_types.grad_accum_dtype={fp32}")
    assert not runs("deepspeed=zero0", "+deepspeed.extra.data_types.grad_accum_dtype=bf16")
    offload = "+deepspeed.extra.zero_optimization.offload_optimizer.device"
    assert not runs("deepspeed=zero1", f"{offload}=cpu")  # DeepSpeed's ZeRO optimizer offloads
    assert runs("deepspeed=zero1", f"{offload}=none")
