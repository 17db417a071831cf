"""torch.compile must see each model as one graph: the earlier MaP-DiT code broke graphs with
math.sqrt on tensors and became "very slow". dynamo's explain traces without compiling kernels."""
import pytest
import torch
import torch._dynamo

from models import DiT

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)


@pytest.mark.parametrize("mp", [False, True])
@pytest.mark.parametrize("grad", [True, False])
def test_no_graph_breaks(mp, grad):
    torch._dynamo.reset()
    model = DiT(**TINY, mp=mp).train(grad)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 900]), torch.tensor([0, 9])
    with torch.set_grad_enabled(grad):
        explanation = torch._dynamo.explain(model)(x, t, y, force_drop_ids=torch.zeros(2, dtype=torch.long))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
