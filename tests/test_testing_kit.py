"""x2ct_framework.testing: registration helpers, and contract checks that catch broken components."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from x2ct_framework.errors import RecipeError
from x2ct_framework.plugins import get_plugin_manager
from x2ct_framework.testing import (ContractError, check_dataset, check_loss, check_metric, check_model, create,
                                    isolated_plugins, make_batch, make_case, make_stage, registered,
                                    registered_component)

R = 8  # the contract checks run at 8^3 here to stay fast


# ---- registration helpers ----------------------------------------------------------------------------
class Scaled(nn.Module):
    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale

    def forward(self, pred, target, batch):
        return self.scale * (pred - target).abs().mean()


def test_registered_component_lives_for_the_block_only():
    pm = get_plugin_manager()
    with registered_component("loss", "scaled_l1", Scaled) as inner:
        assert inner is pm
        entry = pm.registry("loss").get("scaled_l1")
        assert entry.factory is Scaled and entry.distribution == "registered in a test"
        assert "l1" in pm.registry("loss")  # installed plugins are still there
    assert "scaled_l1" not in pm.registry("loss")


def test_registered_unregisters_even_when_the_block_fails():
    class Plugin:
        from x2ct_framework.hookspecs import hookimpl

        @staticmethod
        @hookimpl
        def register_metrics(register):
            register("always_one", lambda: (lambda p, t, b: torch.ones(p.shape[0])))

    with pytest.raises(KeyError):
        with registered(Plugin, "always_one_plugin"):
            assert "always_one" in get_plugin_manager().registry("metric")
            raise KeyError("inside the block")
    assert "always_one" not in get_plugin_manager().registry("metric")


def test_isolated_plugins_sees_only_what_it_registers_and_restores_the_manager():
    outer = get_plugin_manager()
    with isolated_plugins(entry_points=False) as pm:
        assert get_plugin_manager() is pm is not outer
        assert pm.registry("loss").names() == []
        with registered_component("loss", "scaled_l1", Scaled):
            assert pm.registry("loss").names() == ["scaled_l1"]
    assert get_plugin_manager() is outer and "l1" in outer.registry("loss")


def test_create_checks_options_like_a_recipe():
    with registered_component("loss", "scaled_l1", Scaled):
        assert create("loss", "scaled_l1", {"scale": 2.0}).scale == 2.0
        with pytest.raises(RecipeError, match=r"scaled_l1'.*-> scal: unknown option.*did you mean \"scale\""):
            create("loss", "scaled_l1", {"scal": 2.0})
        with pytest.raises(RecipeError, match="scale: expected float, got 'big'"):
            create("loss", "scaled_l1", {"scale": "big"})
        with pytest.raises(ValueError, match="kind must be one of"):
            create("losses", "scaled_l1")


def test_create_dataset_gets_split_and_stage():
    seen = {}

    def factory(*, split, stage, size: int = 3):
        seen.update(split=split, stage=stage, size=size)
        return [0] * size

    with registered_component("dataset", "recorder", factory):
        create("dataset", "recorder", {"size": 2}, split="val", resolution=24)
    assert seen["split"] == "val" and seen["stage"].resolution == 24 and seen["size"] == 2


def test_make_batch_follows_the_batch_contract():
    batch = make_batch(3, views=[0, 45, 90, 135], resolution=R, image_size=12)
    assert batch["xrays"].shape == (3, 4, 1, 12, 12) and batch["ct"].shape == (3, 1, R, R, R)
    assert batch["geometry"]["angles"].shape == (3, 4)
    assert torch.equal(batch["geometry"]["angles"][0], torch.tensor([0.0, 45.0, 90.0, 135.0]))
    assert batch["labels"].dtype == torch.uint8 and set(batch["labels"].unique().tolist()) <= {0, 1, 2, 3, 4}
    assert 0 <= batch["ct"].min() and batch["ct"].max() <= 1 and batch["xrays"].max() > 0.05
    assert not torch.equal(batch["ct"][0], batch["ct"][1])  # cases differ
    assert torch.equal(make_case(1, resolution=R)["ct"], make_case(1, resolution=R)["ct"])  # and are seeded
    assert batch["case_id"] == ["testing-0-000", "testing-0-001", "testing-0-002"]


# ---- built-in components pass -------------------------------------------------------------------------
def test_builtin_l1_keeps_the_loss_contract():
    assert "autocast float16" in check_loss(create("loss", "l1"), resolution=R)


def test_builtin_model_keeps_the_model_contract():
    model = create("model", "vit_cascade", {"tokens": 4, "dim": 16, "depth": 1, "heads": 2, "channels": 4,
                                            "encoder": "test_efficientnet", "decoder_levels": 1},
                   resolution=R)
    assert "gradients reach every trainable parameter" in check_model(model, resolution=R)


def test_builtin_dataset_keeps_the_dataset_contract():
    ds = create("dataset", "synthetic_phantom", {"num_train": 2, "views": [0, 90]}, resolution=R)
    passed = check_dataset(ds, resolution=R, views=[0, 90])
    assert "picklable for worker processes" in passed and "item 1: ct" in passed


def test_builtin_psnr_keeps_the_metric_contract():
    assert "identical inputs score best" in check_metric(create("metric", "psnr"), resolution=R,
                                                         higher_is_better=True)


# ---- broken losses are caught, each by the right check --------------------------------------------------
class PerCase(nn.Module):
    def forward(self, pred, target, batch):
        return (pred - target).abs().flatten(1).mean(1)


class Detached(nn.Module):
    def forward(self, pred, target, batch):
        return (pred.detach() - target).abs().mean()


class Rmse(nn.Module):
    def forward(self, pred, target, batch):
        return torch.sqrt(((pred - target) ** 2).mean())


class Offset(nn.Module):
    def forward(self, pred, target, batch):
        return (pred - target).abs().mean() + 0.1


class InPlace(nn.Module):
    def forward(self, pred, target, batch):
        target.clamp_(0.1, 0.9)
        return (pred - target).abs().mean()


class Fp16Overflow(nn.Module):
    """Casts the target to pred's dtype and sums large squares: overflows in float16 only."""

    def forward(self, pred, target, batch):
        err = (pred - target.to(pred.dtype)) * 1000
        return (err**2).sum() / 1e6


class FixedBatch(nn.Module):
    def forward(self, pred, target, batch):
        return (pred - target).abs().reshape(2, 1, *pred.shape[2:]).mean()


@pytest.mark.parametrize("loss, identical, broken", [
    (PerCase(), "zero", "returns a finite scalar: the loss returned shape (2,), expected a scalar"),
    (Detached(), "zero", "gradient flows to pred: the result does not require grad"),
    (Rmse(), "zero", "zero on identical inputs: the gradient at pred == target is not finite"),
    (Offset(), "zero", "zero on identical inputs: expected 0"),
    (InPlace(), "zero", "inputs are not modified: pred or target changed in place"),
    (Fp16Overflow(), None, "autocast float16: the loss under autocast float16 returned inf"),
    (FixedBatch(), "zero", "batch of one: raised RuntimeError"),
], ids=lambda x: type(x).__name__ if isinstance(x, nn.Module) else None)
def test_check_loss_catches(loss, identical, broken):
    with pytest.raises(ContractError) as err:
        check_loss(loss, resolution=R, identical=identical)
    assert broken in str(err.value)
    assert str(err.value).startswith(f"loss {type(loss).__name__} broke")


def test_check_loss_minimum_accepts_an_offset_loss():
    passed = check_loss(Offset(), resolution=R, identical="minimum")
    assert "minimum on identical inputs" in passed


def test_check_loss_reports_every_broken_check_at_once():
    with pytest.raises(ContractError) as err:
        check_loss(Detached(), resolution=R, identical="zero")
    failures = err.value.failures
    assert any(f.startswith("gradient flows to pred") for f in failures)
    assert any(f.startswith("autocast bfloat16") for f in failures)
    assert len(failures) >= 3


# ---- broken models ----------------------------------------------------------------------------------------
class TinyModel(nn.Module):
    uses_geometry = False  # by design: the volume is a function of the mean image only

    def __init__(self, resolution=R, mode="ok"):
        super().__init__()
        self.r, self.mode = resolution, mode
        self.head = nn.Linear(1, 1)
        self.unused = nn.Linear(2, 2)

    def forward(self, xrays, geometry, prev=None):
        b = xrays.shape[0]
        m = xrays.mean(dim=(1, 2, 3, 4)).reshape(b, 1, 1, 1, 1, 1)
        vol = self.head(m).reshape(b, 1, 1, 1, 1).expand(b, 1, self.r, self.r, self.r)
        if self.mode == "no_channel":
            return vol[:, 0]
        if self.mode == "dropout":
            vol = F.dropout(vol + 1, p=0.5, training=True)
        if prev is not None:
            if self.mode != "prev_same_size":
                prev = F.interpolate(prev, size=(self.r,) * 3, mode="trilinear")
            vol = vol + prev
        return vol + (0 * self.unused(torch.zeros(2)).sum() if self.mode != "unused" else 0)


@pytest.mark.parametrize("mode, broken", [
    ("no_channel", f"output shape [B, 1, R, R, R]: expected (2, 1, {R}, {R}, {R}), got (2, {R}, {R}, {R})"),
    ("unused", "gradients reach every trainable parameter: 2 parameter(s) get no gradient (unused in forward?): "
               "unused.weight, unused.bias"),
    ("dropout", "deterministic in eval mode: two calls in eval mode gave different outputs"),
    ("prev_same_size", "accepts the previous stage's prediction: raised RuntimeError"),
])
def test_check_model_catches(mode, broken):
    with pytest.raises(ContractError) as err:
        check_model(TinyModel(mode=mode), resolution=R)
    assert broken in str(err.value)


def test_check_model_passes_the_tiny_model_and_restores_its_mode():
    model = TinyModel().eval()
    assert len(check_model(model, resolution=R)) == 11  # 8 + the X-ray gradient + every view + batch independence
    assert not model.training and all(p.grad is None for p in model.parameters())


# ---- broken datasets ----------------------------------------------------------------------------------------
class TinyDataset(Dataset):
    def __init__(self, n=2, mode="ok"):
        self.n, self.mode = n, mode
        if mode == "lambda":
            self.transform = lambda x: x

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        item = make_case(i, resolution=R)
        if self.mode == "hu":
            item["ct"] = item["ct"] * 4000 - 1000
        elif self.mode == "no_geometry":
            del item["geometry"]
        elif self.mode == "float_labels":
            item["labels"] = item["labels"].float()
        elif self.mode == "random":
            item["xrays"] = item["xrays"] * torch.rand(())
        elif self.mode == "angles":
            item["geometry"]["angles"] = item["geometry"]["angles"][:1]
        elif self.mode == "nan":
            item["ct"][0, 0, 0, 0] = float("nan")
        return item


@pytest.mark.parametrize("n, mode, kwargs, broken", [
    (0, "ok", {}, "has items: len(dataset) is 0: an empty split"),
    (2, "hu", {}, "item 0: ct: values outside [0, 1]: -1000.."),
    (2, "no_geometry", {}, "item 0: keys: missing geometry"),
    (2, "float_labels", {}, "item 0: labels: expected a uint8 or int64 tensor, got tensor torch.float32"),
    (2, "random", {}, "same index, same item: dataset[0] differs between two calls"),
    (2, "lambda", {}, "picklable for worker processes: pickling failed"),
    (2, "angles", {}, "geometry['angles']: expected a first dimension of 2 (one entry per view), got (1,)"),
    (2, "nan", {}, "item 0: ct: NaN or infinite values"),
    (2, "ok", {"resolution": 16}, "item 0: ct: expected D = 16 (the stage resolution), got 8"),
    (2, "ok", {"views": [0, 45, 90]}, "item 0: xrays: expected 3 views, got 2"),
])
def test_check_dataset_catches(n, mode, kwargs, broken):
    with pytest.raises(ContractError) as err:
        check_dataset(TinyDataset(n, mode), **kwargs)
    assert broken in str(err.value)


def test_check_dataset_runs_a_real_worker_process():
    assert "loads in 1 worker process(es)" in check_dataset(TinyDataset(), resolution=R, views=[0, 90], workers=1)


# ---- broken metrics -----------------------------------------------------------------------------------------
def batch_mean_mae(pred, target, batch):
    return (pred - target).abs().mean()


def relative_mae(pred, target, batch):
    err = (pred - target).abs().flatten(1).mean(1)
    return err / err.mean()


def mae(pred, target, batch):
    return (pred - target).abs().flatten(1).mean(1)


@pytest.mark.parametrize("metric, kwargs, broken", [
    (batch_mean_mae, {}, "one finite value per case [B]: expected shape (3,), got ()"),
    (relative_mae, {}, "per case, independent of the batch"),
    (mae, {"higher_is_better": True}, "identical inputs score best"),
])
def test_check_metric_catches(metric, kwargs, broken):
    with pytest.raises(ContractError) as err:
        check_metric(metric, resolution=R, **kwargs)
    assert broken in str(err.value)


def test_check_metric_passes_mae_declared_lower_is_better():
    assert "identical inputs score best" in check_metric(mae, resolution=R, higher_is_better=False)


def test_make_stage_options():
    stage = make_stage(32, name="stage2", index=2, epochs=3)
    assert (stage.name, stage.index, stage.resolution, stage.options["epochs"]) == ("stage2", 2, 32, 3)
