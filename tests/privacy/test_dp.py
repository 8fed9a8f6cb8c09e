"""Tests for privacy.dp: one real Opacus DP-SGD run on a small tabular task."""

from __future__ import annotations

import json
import math

import pytest
import torch
from sklearn.datasets import load_breast_cancer
from sklearn.preprocessing import StandardScaler
from torch import nn

from privacy.accounting import epsilon_of
from privacy.dp import DPParams, TrainResult, sampling_plan, train_dp
from privacy.errors import AccountingError, PrivacyError, Reason

DELTA = 1e-5
RUN = {"batch_size": 64, "epochs": 5, "lr": 0.5, "max_grad_norm": 1.0, "delta": DELTA}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models on a shared 2-core machine: intra-op threads only contend.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data():
    x, y = load_breast_cancer(return_X_y=True)
    x = StandardScaler().fit_transform(x)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.long)


def mlp(seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(30, 16), nn.ReLU(), nn.Linear(16, 2))


def accuracy(state: dict[str, torch.Tensor], x, y) -> float:
    model = mlp()
    model.load_state_dict(state)
    with torch.no_grad():
        return (model(x).argmax(dim=1) == y).float().mean().item()


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(((a[k] - b[k]) ** 2).sum()) for k in a))


@pytest.fixture(scope="module")
def trained(data) -> tuple[nn.Module, dict[str, torch.Tensor], TrainResult]:
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_dp(model, *data, noise_multiplier=1.0, seed=1, **RUN)
    return model, before, result


# ----------------------------------------------------------------- one run


def test_learns_with_moderate_noise(data, trained):
    _, before, result = trained
    initial = accuracy(before, *data)
    final = accuracy(result.state, *data)
    assert final > initial
    assert final >= 0.9
    with torch.no_grad():
        initial_loss = nn.CrossEntropyLoss()(mlp()(data[0]), data[1]).item()
    assert 0 < result.train_loss < initial_loss


def test_state_has_the_input_models_schema(trained):
    model, _, result = trained
    assert list(result.state) == list(model.state_dict())
    assert not any("_module" in name for name in result.state)
    for name, tensor in result.state.items():
        original = model.state_dict()[name]
        assert tensor.shape == original.shape
        assert tensor.dtype == torch.float32
        assert tensor.is_contiguous()
        assert not tensor.requires_grad
        assert tensor.data_ptr() != original.data_ptr()
        assert torch.isfinite(tensor).all()


def test_callers_model_is_not_modified(trained):
    model, before, result = trained
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name])
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    assert distance(result.state, before) > 0


def test_records_the_dp_parameters_of_the_run(data, trained):
    _, _, result = trained
    n = len(data[0])
    q, steps = sampling_plan(n, RUN["batch_size"], RUN["epochs"])
    assert q == 1 / math.ceil(n / RUN["batch_size"])  # Opacus: 1 / len(data loader)
    assert steps == round(RUN["epochs"] / q)
    assert result.params == DPParams(1.0, q, steps, RUN["max_grad_norm"], DELTA)
    assert result.num_samples == n
    # the record is a history entry as it stands
    assert epsilon_of([result.params], DELTA) == epsilon_of([(1.0, q, steps)], DELTA)


def test_huge_noise_runs_but_learns_less(data, trained):
    _, before, moderate = trained
    noisy = train_dp(mlp(), *data, noise_multiplier=50.0, seed=1, **RUN)
    assert noisy.params.noise_multiplier == 50.0
    assert noisy.params.steps == moderate.params.steps
    assert all(torch.isfinite(t).all() for t in noisy.state.values())
    assert accuracy(noisy.state, *data) < accuracy(moderate.state, *data)
    # the noise, not the data, moved the weights
    assert distance(noisy.state, before) > 5 * distance(moderate.state, before)


def test_proximal_term_keeps_weights_near_the_base(data, trained):
    _, before, free = trained
    anchored = train_dp(mlp(), *data, noise_multiplier=1.0, seed=1, proximal_rho=1.0, **RUN)
    assert distance(anchored.state, before) < 0.7 * distance(free.state, before)
    assert anchored.params == free.params  # the penalty costs no privacy


def test_seeded_runs_are_reproducible_and_leave_global_rng_alone(data):
    rng_before = torch.get_rng_state()
    args = {**RUN, "epochs": 1}
    a = train_dp(mlp(), *data, noise_multiplier=1.0, seed=7, **args)
    b = train_dp(mlp(), *data, noise_multiplier=1.0, seed=7, **args)
    c = train_dp(mlp(), *data, noise_multiplier=1.0, seed=8, **args)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)
    assert not all(torch.equal(a.state[k], c.state[k]) for k in a.state)


def test_unseeded_runs_draw_fresh_noise(data):
    rng_before = torch.get_rng_state()
    args = {**RUN, "epochs": 1}
    a = train_dp(mlp(), *data, noise_multiplier=1.0, **args)
    b = train_dp(mlp(), *data, noise_multiplier=1.0, **args)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert all(not torch.equal(a.state[k], b.state[k]) for k in a.state)


def test_empty_poisson_batches_still_count_as_steps(data):
    # 20 examples at q = 1/20: a batch is empty with probability 0.95^20 ~ 36%.
    x, y = data[0][:20], data[1][:20]
    result = train_dp(mlp(), x, y, noise_multiplier=1.0, batch_size=1, epochs=3, lr=0.1,
                      max_grad_norm=1.0, delta=DELTA, seed=3)
    assert result.params.sample_rate == 1 / 20
    assert result.params.steps == 60
    assert all(torch.isfinite(t).all() for t in result.state.values())


def test_custom_loss_function(data):
    x, y = data
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(30, 1), nn.Flatten(0))
    result = train_dp(model, x, y.float(), noise_multiplier=1.0, batch_size=64, epochs=2,
                      lr=0.1, max_grad_norm=1.0, delta=DELTA, seed=0, loss_fn=nn.MSELoss())
    assert list(result.state) == ["0.weight", "0.bias"]
    assert math.isfinite(result.train_loss)


def test_models_that_would_change_schema_are_refused(data):
    model = nn.Sequential(nn.Linear(30, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    with pytest.raises(AccountingError) as info:
        train_dp(model, *data, noise_multiplier=1.0, **RUN)
    assert info.value.reason is Reason.INVALID_DP_PARAMETERS
    assert isinstance(model[1], nn.BatchNorm1d)  # the caller's model is untouched


@pytest.mark.parametrize(
    "change",
    [
        {"noise_multiplier": 0.0},
        {"noise_multiplier": float("nan")},
        {"batch_size": 0},
        {"batch_size": 10_000},
        {"epochs": 0},
        {"epochs": 1.5},
        {"lr": 0.0},
        {"max_grad_norm": -1.0},
        {"delta": 1.0},
        {"proximal_rho": -0.1},
        {"momentum": 1.0},
        {"seed": -1},
    ],
)
def test_invalid_arguments_are_typed_errors(data, change):
    args = {"noise_multiplier": 1.0, **RUN, **change}
    with pytest.raises(AccountingError) as info:
        train_dp(mlp(), *data, **args)
    assert info.value.reason is Reason.INVALID_DP_PARAMETERS


def test_mismatched_data_is_refused(data):
    x, y = data
    with pytest.raises(PrivacyError):
        train_dp(mlp(), x, y[:-1], noise_multiplier=1.0, **RUN)
    with pytest.raises(PrivacyError):
        train_dp(mlp(), x.numpy(), y, noise_multiplier=1.0, **RUN)


# ----------------------------------------------------------------- DPParams


GOOD = {
    "noise_multiplier": 1.1, "sample_rate": 0.01, "steps": 300, "max_grad_norm": 1.0, "delta": 1e-5,
}


def test_dp_params_round_trip_through_json():
    params = DPParams(1.1, 0.01, 300, 1.0, 1e-5)
    wire = json.dumps(params.to_dict())
    assert DPParams.from_dict(json.loads(wire)) == params
    assert params.to_dict() == GOOD
    assert DPParams(1, 0.5, 3, 2, 1e-6).to_dict()["noise_multiplier"] == 1.0


@pytest.mark.parametrize(
    "data",
    [
        {k: v for k, v in GOOD.items() if k != "delta"},
        {**GOOD, "epsilon": 3.0},
        {**GOOD, "steps": 30.5},
        {**GOOD, "sample_rate": 2.0},
        {**GOOD, "max_grad_norm": 0},
        {**GOOD, "delta": 0},
        {**GOOD, "noise_multiplier": "1.1"},
        list(GOOD.values()),
    ],
)
def test_dp_params_from_bad_dict(data):
    with pytest.raises(AccountingError) as info:
        DPParams.from_dict(data)
    assert info.value.reason is Reason.INVALID_DP_PARAMETERS
