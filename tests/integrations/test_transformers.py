"""``GradClipCallback`` with a real ``transformers.Trainer`` on CPU (a tiny model, no downloads).

A probe callback listed before ``GradClipCallback`` records the pre-clip gradients at
``on_pre_optimizer_step``; step hooks on the torch optimizer inside the Trainer's
``AcceleratedOptimizer`` record what the update uses. Expected gradients: see
``clip_reference`` (torch / the paper's formula for stateless strategies, a separate
clipper instance fed the same gradients for the stateful ones).
"""

from __future__ import annotations

import functools
import importlib
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import Tensor, nn
from torch.amp.grad_scaler import OptState
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from gradclip.clippers.fixed import NormClip
from gradclip.integrations.transformers import STATE_FILE, GradClipCallback
from integrations.bad_specs import bad_specs
from integrations.clip_reference import assert_grads, check_steps, reference

LR = 0.1
STEPS = 4


class Tiny(nn.Module):
    """Two linear layers returning ``{"loss", "logits"}`` like a transformers model."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(6, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> dict[str, Tensor]:
        out = self.head(torch.tanh(self.body(x)))
        loss = F.mse_loss(out.float(), labels) * 10
        return {"loss": loss, "logits": out}


class Deep(nn.Module):
    """Seven linear layers: 14 tensors, so the order their norms are summed in shows."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.Linear(6, 6) for _ in range(6)])
        self.head = nn.Linear(6, 2)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> dict[str, Tensor]:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        out = self.head(x)
        return {"loss": F.mse_loss(out, labels) * 100, "logits": out}


def dataset() -> list[dict[str, Tensor]]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 6, generator=gen)
    y = torch.randn(16, 2, generator=gen) * 3
    return [{"x": x[i], "labels": y[i]} for i in range(16)]


def arguments(tmp_path: Path, **overrides: Any) -> TrainingArguments:
    options: dict[str, Any] = {
        "output_dir": str(tmp_path / "out"),
        "max_steps": STEPS,
        "per_device_train_batch_size": 4,
        "learning_rate": LR,
        "lr_scheduler_type": "constant",
        "optim": "sgd",
        "max_grad_norm": 0,
        "logging_steps": 2,
        "report_to": "none",
        "save_strategy": "no",
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
    }
    options.update(overrides)
    return TrainingArguments(**options)


class Probe(TrainerCallback):  # type: ignore[misc]
    """List before GradClipCallback: records pre-clip gradients and what each update used."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.at_step: list[dict[str, Any]] = []
        self.names: list[str] = []
        self.params: list[Tensor] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model, optimizer = kwargs["model"], kwargs["optimizer"]
        # The optimizer's parameters in the model's order: the order the callback binds
        # them in (the Trainer's default optimizer groups decay / no-decay parameters).
        held = {id(p) for p in _params(optimizer)}
        named = [(n, p) for n, p in model.named_parameters() if id(p) in held]
        assert len(named) == len(held)
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        inner = optimizer.optimizer
        inner.register_step_pre_hook(self._pre)
        inner.register_step_post_hook(self._post)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        optimizer = kwargs["optimizer"]
        scaler = optimizer.scaler
        params = self.params
        self.records.append(
            {
                "grads": [p.grad.detach().clone() for p in params],
                "params": [p.detach().clone() for p in params],
                "scale": None if scaler is None else scaler.get_scale(),
                "stage": None
                if scaler is None
                else scaler._per_optimizer_states[id(optimizer.optimizer)]["stage"],
            }
        )

    def _pre(self, *_: Any) -> None:
        self.at_step.append(
            {
                "grads": [p.grad.detach().clone() for p in self.params],
                "before": [p.detach().clone() for p in self.params],
            }
        )

    def _post(self, *_: Any) -> None:
        self.at_step[-1]["after"] = [p.detach().clone() for p in self.params]


class LogRecorder(TrainerCallback):  # type: ignore[misc]
    def __init__(self) -> None:
        self.logs: list[dict[str, float]] = []

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        self.logs.append(dict(logs))


def _params(optimizer: Any) -> list[Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def train(tmp_path: Path, callbacks: list[Any], **overrides: Any) -> Trainer:
    trainer = Trainer(
        model=Tiny(),
        args=arguments(tmp_path, **overrides),
        train_dataset=dataset(),
        callbacks=callbacks,
    )
    trainer.train()
    return trainer


SPECS = ["norm:0.5", "value:0.05", "agc:0.02", "zclip:z=0.5,warmup=2", "autoclip:p=50"]


@pytest.mark.parametrize("spec", SPECS)
def test_clips_as_the_strategy_says(tmp_path: Path, spec: str) -> None:
    probe, clip = Probe(), GradClipCallback(spec)
    train(tmp_path, [probe, clip])
    assert len(probe.records) == STEPS
    check_steps(spec, probe.names, probe.records, probe.at_step, LR)
    assert clip.clipper is not None and clip.clipper.step == STEPS


def test_bf16(tmp_path: Path) -> None:
    probe = Probe()
    train(tmp_path, [probe, GradClipCallback("zclip:z=0.5,warmup=2")], bf16=True)
    check_steps("zclip:z=0.5,warmup=2", probe.names, probe.records, probe.at_step, LR)


def test_fp16_loss_scaler_unscaled_once(tmp_path: Path) -> None:
    """The Trainer's own fp16 path with a real GradScaler (CPU has none by default).

    transformers 5 unscales before ``on_pre_optimizer_step`` (measuring grad_norm);
    the callback must not unscale again (GradScaler would raise) and the update
    must use the clip of the unscaled gradients.
    """
    probe = Probe()
    trainer = Trainer(
        model=Tiny(),
        args=arguments(tmp_path, fp16=True),
        train_dataset=dataset(),
        callbacks=[probe, GradClipCallback("norm:0.5")],
    )
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    trainer.accelerator.native_amp = True
    trainer.train()
    assert {r["stage"] for r in probe.records} == {OptState.UNSCALED}
    assert all(r["scale"] == 2.0**8 for r in probe.records)  # no overflow, no skipped step
    check_steps("norm:0.5", probe.names, probe.records, probe.at_step, LR)


def test_unscales_gradients_the_trainer_left_scaled(tmp_path: Path) -> None:
    """transformers 4.x with max_grad_norm=0 reaches the event with scaled gradients.

    Drives the event with a real prepared ``AcceleratedOptimizer`` whose GradScaler
    has not unscaled yet: the callback unscales once, clips, and the optimizer step
    does not unscale again.
    """
    # TrainingArguments resets accelerate's shared state: build them first.
    args, state, control = arguments(tmp_path), TrainerState(), TrainerControl()
    accelerator = Accelerator(cpu=True, mixed_precision="fp16")
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    accelerator.native_amp = True
    model = Tiny()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LR))
    batch = dataset()[:4]
    x = torch.stack([b["x"] for b in batch])
    labels = torch.stack([b["labels"] for b in batch])
    with accelerator.autocast():
        loss = model(x, labels)["loss"]
    accelerator.backward(loss)
    scaled = [p.grad.clone() for p in model.parameters()]
    params = [p.detach().clone() for p in model.parameters()]
    record = {"grads": scaled, "params": params, "scale": 2.0**8, "stage": OptState.READY}

    callback = GradClipCallback("norm:0.5")
    callback.on_train_begin(args, state, control, model=model, optimizer=optimizer)
    callback.on_pre_optimizer_step(args, state, control, optimizer=optimizer)
    stage = accelerator.scaler._per_optimizer_states[id(optimizer.optimizer)]["stage"]
    assert stage is OptState.UNSCALED
    names = [n for n, _ in model.named_parameters()]
    (want,) = reference("norm:0.5", names, [record])
    assert_grads([p.grad for p in model.parameters()], want)
    optimizer.step()  # scaler.step: must not unscale a second time
    for p, before, g in zip(model.parameters(), params, want):
        torch.testing.assert_close(p.detach(), before - LR * g, rtol=1e-6, atol=1e-7)


def test_logs_pre_and_post_norms(tmp_path: Path) -> None:
    probe, clip, later = Probe(), GradClipCallback("norm:40"), LogRecorder()
    trainer = train(tmp_path, [probe, clip, later])
    pre = [
        float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in r["grads"]])))
        for r in probe.records
    ]
    clipped = [n > 40 for n in pre]
    assert clipped == [False, True, True, True], "the windows must have rates 1/2 and 1"
    history = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in history] == [2, 4]
    for logs in (history, [g for g in later.logs if "loss" in g]):
        for entry, last in zip(logs, (1, 3)):
            assert entry["grad_norm_pre"] == pytest.approx(pre[last], rel=1e-6)
            assert entry["grad_norm_pre"] == pytest.approx(entry["grad_norm"], rel=1e-6)
            assert entry["grad_norm_post"] == pytest.approx(min(pre[last], 40.0), rel=1e-6)
            assert entry["grad_clip_threshold"] == 40.0
            assert entry["grad_clip_rate"] == sum(clipped[last - 1 : last + 1]) / 2
    summary = trainer.state.log_history[-1]
    assert "train_loss" in summary and "grad_norm_pre" not in summary


def tiny_gpt2() -> GPT2LMHeadModel:
    """A transformers GPT-2 built from a config (random weights, nothing downloaded)."""
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=32)
    return GPT2LMHeadModel(config)


def token_dataset() -> list[dict[str, Tensor]]:
    ids = torch.randint(0, 64, (16, 12), generator=torch.Generator().manual_seed(2))
    return [{"input_ids": row, "labels": row} for row in ids]


@pytest.mark.parametrize("spec", ["norm:0.25", "agc:0.02"])
def test_a_transformers_model_with_tied_weights(tmp_path: Path, spec: str) -> None:
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight  # tied: one parameter
    probe, clip, later = Probe(), GradClipCallback(spec), LogRecorder()
    trainer = Trainer(
        model=model,
        args=arguments(tmp_path),
        train_dataset=token_dataset(),
        callbacks=[probe, clip, later],
    )
    trainer.train()
    assert len(probe.records) == STEPS
    # The clipper binds the tied matrix once, as the optimizer holds it.
    assert clip.clipper is not None
    bound = [p for g in clip.clipper.param_groups for p in g["params"]]
    assert len(bound) == len({id(p) for p in model.parameters()}) == len(probe.names)
    assert "transformer.wte.weight" in probe.names and "lm_head.weight" not in probe.names
    # ... in the model's order, not the optimizer's (decay / no-decay groups).
    assert [id(p) for p in bound] == [id(p) for p in model.parameters()]
    assert [id(p) for p in bound] != [id(p) for p in _params(trainer.optimizer)]
    # What reached the optimizer is the strategy's clip of the pre-clip gradients (and,
    # for norm clipping, torch's formula over each parameter once), applied by SGD.
    check_steps(spec, probe.names, probe.records, probe.at_step, LR)
    pre = [
        float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in r["grads"]])))
        for r in probe.records
    ]
    post = [
        float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in s["grads"]])))
        for s in probe.at_step
    ]
    history = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in history] == [2, 4]
    for logs in (history, [g for g in later.logs if "loss" in g]):
        for entry, last in zip(logs, (1, 3)):
            assert entry["grad_norm_pre"] == pytest.approx(pre[last], rel=1e-5)
            assert entry["grad_norm_post"] == pytest.approx(post[last], rel=1e-5)
            assert entry["grad_norm_post"] < entry["grad_norm_pre"]


@pytest.mark.parametrize("accumulation", [1, 2])
def test_norm_spec_trains_bit_identically_to_max_grad_norm(
    tmp_path: Path, accumulation: int
) -> None:
    """``max_grad_norm=0`` + ``"norm:1.0"`` is the Trainer's ``max_grad_norm=1.0``, bit for bit.

    With the Trainer's default optimizer (AdamW, decay / no-decay parameter groups,
    so its order differs from the model's) and a linear warm-up; 8 optimizer steps,
    every one clipped. Summing the norms in the optimizer's order instead moves the
    parameters by up to 6e-8 here (measured), in both settings.
    """

    def run(max_grad_norm: float, callbacks: list[Any]) -> tuple[Tensor, list[float]]:
        model = Deep()
        overrides = {
            "max_grad_norm": max_grad_norm,
            "max_steps": 8,
            "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": accumulation,
            "optim": "adamw_torch",
            "weight_decay": 0.01,
            "learning_rate": 0.01,
            "warmup_steps": 2,
            "logging_steps": 1,
        }
        trainer = Trainer(
            model=model,
            args=arguments(tmp_path / f"{max_grad_norm}", **overrides),
            train_dataset=dataset(),
            callbacks=callbacks,
        )
        order = [id(p) for p in _params(trainer.create_optimizer())]
        assert order != [id(p) for p in model.parameters()]  # the order matters here
        trainer.train()
        norms = [h["grad_norm"] for h in trainer.state.log_history if "loss" in h]
        vector = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
        return vector, norms

    torch_clip, torch_norms = run(1.0, [])
    callback = GradClipCallback("norm:1.0")
    ours, our_norms = run(0.0, [callback])
    assert len(torch_norms) == 8 and min(torch_norms) > 1.0  # clipped at every step
    assert our_norms == torch_norms
    assert torch.equal(ours, torch_clip), float((ours - torch_clip).abs().max())
    assert callback.clipper is not None and callback.clipper.step == 8


def test_first_in_line_reaches_callbacks_listed_before_it(tmp_path: Path) -> None:
    """The documented way to reach report_to integrations (called before user callbacks)."""
    early = LogRecorder()
    clip = GradClipCallback("norm:0.5")
    trainer = Trainer(
        model=Tiny(), args=arguments(tmp_path), train_dataset=dataset(), callbacks=[early]
    )
    trainer.callback_handler.callbacks.insert(0, clip)
    trainer.train()
    assert [round(g["grad_norm_post"], 4) for g in early.logs if "loss" in g] == [0.5, 0.5]


def test_refuses_max_grad_norm(tmp_path: Path) -> None:
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    assert args.max_grad_norm == 1.0  # the default the message must explain
    with pytest.raises(ValueError) as info:
        Trainer(
            model=Tiny(),
            args=args,
            train_dataset=dataset(),
            callbacks=[GradClipCallback("norm:1.0")],
        )
    message = str(info.value)
    assert "GradClipCallback('norm:1.0')" in message
    assert "TrainingArguments(max_grad_norm=1.0)" in message
    assert "set TrainingArguments(max_grad_norm=0)" in message

    trainer = Trainer(
        model=Tiny(),
        args=arguments(tmp_path),
        train_dataset=dataset(),
        callbacks=[GradClipCallback("norm:1.0")],
    )
    trainer.args.max_grad_norm = 0.5  # changed after the Trainer was built
    with pytest.raises(ValueError, match=r"TrainingArguments\(max_grad_norm=0.5\)"):
        trainer.train()


def test_checkpoint_resume_restores_the_clipper_state(tmp_path: Path) -> None:
    spec = "zclip:z=0.5,warmup=2"
    first = GradClipCallback(spec)
    train(tmp_path, [first], max_steps=2, save_strategy="steps", save_steps=2)
    checkpoint = tmp_path / "out" / "checkpoint-2"
    saved = torch.load(checkpoint / STATE_FILE, weights_only=True)
    assert first.clipper is not None
    assert_same(saved, {"clipper": first.clipper.state_dict()})
    assert saved["clipper"]["step"] == 2

    class AtBegin(TrainerCallback):  # type: ignore[misc]
        def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
            assert resumed.clipper is not None
            self.state = resumed.clipper.state_dict()

    resumed, at_begin = GradClipCallback(spec), AtBegin()
    trainer = Trainer(
        model=Tiny(),
        args=arguments(tmp_path, max_steps=4),
        train_dataset=dataset(),
        callbacks=[resumed, at_begin],
    )
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert_same(at_begin.state, saved["clipper"])
    assert resumed.clipper is not None and resumed.clipper.step == 4

    straight = GradClipCallback(spec)
    train(tmp_path / "straight", [straight])
    assert straight.clipper is not None
    assert_same(resumed.clipper.state_dict(), straight.clipper.state_dict())


def assert_same(a: Any, b: Any) -> None:
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor) and a.dtype == b.dtype and torch.equal(a, b), (a, b)
    elif isinstance(a, dict):
        assert set(a) == set(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def test_instance_and_factory_strategies(tmp_path: Path) -> None:
    probe = Probe()
    train(tmp_path, [probe, GradClipCallback(functools.partial(NormClip, max_norm=0.5))])
    check_steps("norm:0.5", probe.names, probe.records, probe.at_step, LR)

    model = Tiny()
    clip = GradClipCallback(NormClip(model.parameters(), max_norm=0.5))
    trainer = Trainer(
        model=model, args=arguments(tmp_path), train_dataset=dataset(), callbacks=[clip]
    )
    trainer.train()
    assert clip.clipper is not None and clip.clipper.step == STEPS
    assert clip.last_stats is not None and float(clip.last_stats.clipped_norm) == pytest.approx(0.5)


def test_bad_strategy() -> None:
    with pytest.raises(ValueError, match=r"unknown clipping strategy 'nope'.*valid: .*zclip"):
        GradClipCallback("nope")
    with pytest.raises(TypeError, match=r"spec string like 'zclip:z=2.5'.*got float"):
        GradClipCallback(1.0)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="no clipper yet"):
        GradClipCallback("norm:1").state_dict()


BAD_SPECS = bad_specs("GradClipCallback")


@pytest.mark.parametrize(("spec", "error", "message"), BAD_SPECS, ids=[s for s, _, _ in BAD_SPECS])
def test_spec_options_are_checked_at_construction(
    spec: str, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        GradClipCallback(spec)
    # Options that name parameters are checked when the clipper is bound to them.
    GradClipCallback("agc:0.01,exclude=head.*")


def test_missing_transformers_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(sys.modules):
        if name.split(".")[0] == "transformers":
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "gradclip.integrations.transformers")
    with pytest.raises(
        ImportError, match=r"Hugging Face transformers.*pip install 'gradclip\[hf\]'"
    ):
        importlib.import_module("gradclip.integrations.transformers")
