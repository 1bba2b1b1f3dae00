"""The DCNv3 module hands the op its mask logits (softmaxed inside the op): same outputs and
gradients as softmaxing them first, the formulation of docs/model.md §3."""
import torch

from internimage.model import DCNv3
from internimage.ops import dcnv3_core_reference


def test_mask_softmax_inside_the_op_equals_softmax_then_op_in_fp64():
    torch.manual_seed(0)
    module = DCNv3(channels=32, groups=4).double()
    for linear in (module.offset, module.mask):  # they start at zero: move sampling and weights
        torch.nn.init.normal_(linear.weight, std=0.3)
        torch.nn.init.normal_(linear.bias, std=0.3)
    x = torch.randn(2, 6, 7, 32, dtype=torch.float64)

    def softmax_then_op():
        projected = module.input_proj(x)
        branch = module.dw_conv(x.permute(0, 3, 1, 2))
        weights = module.mask(branch).reshape(2, 6, 7, 4, 9).softmax(-1).reshape(2, 6, 7, 36)
        return module.output_proj(dcnv3_core_reference(projected, module.offset(branch), weights, groups=4))

    results = []
    for forward in (module, lambda _: softmax_then_op()):
        module.zero_grad()
        out = forward(x)
        out.square().sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in module.parameters()]))
    (got, got_grads), (want, want_grads) = results
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
