"""Test helpers for plugin authors: register a plugin for one test, and check a component's contract.

```python
from x2ct_framework.testing import check_loss, create, registered

def test_my_loss_keeps_the_contract():
    with registered(my_plugin_module):
        loss = create("loss", "my_loss", {"eps": 1e-3}, hu_window=[-1000, 3000])
    check_loss(loss, identical="zero")
```

Every ``check_*`` runs all of its checks, then raises one :class:`ContractError` (an
``AssertionError``, so pytest shows it as a plain failure) listing every broken check, or returns
the names of the checks that passed. Inputs come from :func:`make_batch`: a small seeded chest-like
volume with DRR views rendered by :mod:`x2ct_framework.physics`, batched exactly as the data loader
batches a dataset's items.
"""

from x2ct_framework.testing.checks import (check_dataset, check_evaluator, check_loss, check_metric, check_model,
                                           check_protocol, check_stored_geometry)
from x2ct_framework.testing.contract import ContractError
from x2ct_framework.testing.data import make_batch, make_case
from x2ct_framework.testing.hooks import FakeTrainer, run_hooks
from x2ct_framework.testing.registration import create, isolated_plugins, make_stage, registered, registered_component

__all__ = [
    "ContractError",
    "isolated_plugins",
    "registered",
    "registered_component",
    "create",
    "make_stage",
    "make_case",
    "make_batch",
    "check_loss",
    "check_model",
    "check_dataset",
    "check_stored_geometry",
    "check_metric",
    "check_protocol",
    "check_evaluator",
    "FakeTrainer",
    "run_hooks",
]
